//! The gRPC interface of `guild-client serve`: the `Shop` service of `guild.proto`
//! (`Recommend`, `Search`), the same two calls as the HTTP/JSON interface, answered by the
//! same engine on the same port (HTTP/2 without TLS, like the JSON interface on the shop's
//! internal network). A request is converted here, at the interface, into the engine's
//! arguments: `k` defaults to 10, and the history's items are left out of recommendations
//! unless `include_seen`. A bad request (an unknown item id, an empty query, `k` out of
//! 1..=100) is answered `INVALID_ARGUMENT` naming what is wrong; a request over 64 KiB is
//! refused before it is decoded. Latency and refusals are recorded beside the JSON
//! interface's, under `grpc_recommend` and `grpc_search`.

use std::sync::Arc;

use guild_proto::v1::shop_server::{Shop, ShopServer};
use guild_proto::v1::{RankedItem, RankedItems, RecommendRequest, SearchRequest};
use tonic::{Request, Response, Status};

use super::http::{AppState, MAX_BODY_BYTES, scored};
use super::{Query, Ranked, ServeError};

/// Items returned when a request does not say how many.
pub const DEFAULT_K: u32 = 10;

/// The `Shop` service over the serving engine.
#[derive(Clone, Debug)]
pub struct ShopService {
    state: Arc<AppState>,
}

/// The service's routes, to merge into the HTTP router.
pub fn routes(state: Arc<AppState>) -> axum::Router {
    let service = ShopServer::new(ShopService { state }).max_decoding_message_size(MAX_BODY_BYTES);
    tonic::service::Routes::new(service).into_axum_router()
}

fn answer(result: Result<Ranked, ServeError>) -> Result<Response<RankedItems>, Status> {
    match result {
        Ok(ranked) => Ok(Response::new(RankedItems {
            adapter_version: ranked.adapter_version,
            items: ranked
                .items
                .into_iter()
                .map(|hit| RankedItem { item_id: hit.item_id, title: hit.title, score: hit.score })
                .collect(),
        })),
        Err(ServeError::BadRequest(message)) => Err(Status::invalid_argument(message)),
        Err(e) => {
            tracing::error!("serving failed: {e}");
            Err(Status::internal(e.to_string()))
        }
    }
}

#[tonic::async_trait]
impl Shop for ShopService {
    async fn recommend(&self, request: Request<RecommendRequest>) -> Result<Response<RankedItems>, Status> {
        let RecommendRequest { history, k, include_seen } = request.into_inner();
        let k = k.unwrap_or(DEFAULT_K) as usize;
        let query = Query::Recommend { history, k, exclude_seen: !include_seen };
        answer(scored(&self.state, "grpc_recommend", query).await)
    }

    async fn search(&self, request: Request<SearchRequest>) -> Result<Response<RankedItems>, Status> {
        let SearchRequest { query, history, k } = request.into_inner();
        let k = k.unwrap_or(DEFAULT_K) as usize;
        let query = Query::Search { text: query, history, k };
        answer(scored(&self.state, "grpc_search", query).await)
    }
}
