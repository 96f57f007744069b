//! SecAgg+ secure aggregation (Bonawitz et al. 2017 with the sparse neighbour graph of
//! Bell et al. 2020): message types shared by the client and server state machines.

pub mod message;
