"""Flower's own SecAgg+ workflow, timed: the peer Guild's secure aggregation is compared with.

Runs `flwr`'s `SecAggPlusWorkflow` (server) and `secaggplus_mod` (clients) in Flower's
simulation runtime on this machine: N clients, each returning a random float32 vector of
length D, every client in every round, no dropout. Prints one JSON line: the mean seconds of
a SecAgg+ round after the first (the workflow's `__call__`, from the server's first message
to the aggregate) and the peak resident memory of the server's process.

    python bench_flower_secagg.py --clients 100 --dimension 1048576 --rounds 3 \
        --shares 21 --threshold 14

`--shares` is Flower's `num_shares` (each client's neighbours plus itself), so 21 matches a
Guild SecAgg+ graph of 20 neighbours. Used by `scripts/bench-flower`.
"""

import argparse
import json
import resource
import sys
import time

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.simulation import run_simulation


def arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--dimension", type=int, default=1 << 20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shares", type=int, default=21)
    parser.add_argument("--threshold", type=int, default=14)
    return parser.parse_args()


class TimedSecAggPlus(SecAggPlusWorkflow):
    """`SecAggPlusWorkflow`, recording how long each round's protocol takes."""

    seconds = []

    def __call__(self, grid, context):
        started = time.perf_counter()
        super().__call__(grid, context)
        TimedSecAggPlus.seconds.append(time.perf_counter() - started)


def main():
    args = arguments()

    class RandomClient(NumPyClient):
        def __init__(self, seed):
            self.rng = np.random.default_rng(seed)

        def fit(self, parameters, config):
            # Within Flower's default clipping range (8.0), as a clipped update would be.
            update = self.rng.uniform(-1.0, 1.0, args.dimension).astype(np.float32)
            return [update], 1, {}

    def client_fn(context: Context):
        return RandomClient(context.node_id % (1 << 32)).to_client()

    client_app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
    server_app = ServerApp()

    @server_app.main()
    def _(grid, context):
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=args.clients,
            min_available_clients=args.clients,
            initial_parameters=ndarrays_to_parameters([np.zeros(args.dimension, np.float32)]),
        )
        context = LegacyContext(context=context, config=ServerConfig(num_rounds=args.rounds), strategy=strategy)
        workflow = DefaultWorkflow(
            fit_workflow=TimedSecAggPlus(num_shares=args.shares, reconstruction_threshold=args.threshold)
        )
        workflow(grid, context)

    started = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=args.clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    rounds = TimedSecAggPlus.seconds
    if len(rounds) != args.rounds:
        sys.exit(f"Flower completed {len(rounds)} of {args.rounds} SecAgg+ rounds")
    timed = rounds[1:] if len(rounds) > 1 else rounds
    print(
        json.dumps(
            {
                "system": "flower",
                "flwr": __import__("flwr").__version__,
                "clients": args.clients,
                "dimension": args.dimension,
                "shares": args.shares,
                "threshold": args.threshold,
                "round_seconds": rounds,
                "mean_round_seconds": sum(timed) / len(timed),
                "wall_seconds": time.perf_counter() - started,
                # ru_maxrss is in KiB on Linux: the server's process (the ServerApp and the
                # simulation runtime; Ray runs the clients in worker processes of their own).
                "server_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


if __name__ == "__main__":
    main()
