"""``python -m fedml_progfed.bench [--quick] --out DIR``: side-by-side measurements in one run.

(a) ProgFed vs e2e on the quickstart setup: ratios of two-way bytes, client FLOPs
    and wall time, and the accuracy difference.
(b) The compression matrix: ProgFed and e2e per uplink codec (ProgFed Sec. 4.4,
    Table 5): two-way bytes as a share of float e2e, accuracy difference.
(c) Our standalone simulator against FedML's own ``backend: sp`` FedAvg
    (``FedAvgAPI``) on the same model, data, rounds and clients in this process:
    ``simulator_speed_ratio_vs_fedml`` = our mean per-round time / FedML's.
(d) Wire efficiency: encoded bytes of a real upload / its information-theoretic
    payload (bits per value times values).

Writes ``DIR/bench.json`` and ``DIR/bench.txt`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from statistics import mean, median
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "config" / "quickstart.yaml"
PROFL_QUICKSTART = ROOT / "config" / "profl_quickstart.yaml"
QUICK_VARIANTS = ("float", "lq8", "lq8+sp25")
FULL_VARIANTS = ("float", "lq8", "lq4", "lq2", "sp25", "sp10", "lq8+sp25", "lq8+sp10", "topk10+ef")
WIRE_SPECS = ("float", "lq8", "lq4", "lq2", "sp25", "lq8+sp25", "topk10")


def _matrix(out: Path, quick: bool) -> dict[str, Any]:
    from fedml_progfed.runners.experiment import run_comparison

    # quick: 40 rounds of one local epoch (the quickstart runs five), so the matrix of six runs takes minutes
    overrides = ["train_args.comm_round=40", "train_args.epochs=1", "validation_args.frequency_of_the_test=4"] if quick else []
    variants = QUICK_VARIANTS if quick else FULL_VARIANTS
    run_comparison(str(QUICKSTART), overrides, out / "matrix", show_progress=False, variants=variants)
    result = json.loads((out / "matrix" / "comparison.json").read_text())
    runs = {(r["method"], r["variant"]): r for r in result["runs"]}
    base = runs[("e2e", "float")]
    two_way = lambda r: r["total_bytes_up"] + r["total_bytes_down"]  # noqa: E731
    prog = runs[("progfed", "float")]
    headline = {
        "bytes_ratio": two_way(prog) / two_way(base),
        "flops_ratio": prog["total_flops"] / base["total_flops"],
        "wall_ratio": prog["wall_s"] / base["wall_s"],
        "accuracy_diff": prog["final_metric"] - base["final_metric"],
        "progfed_final": prog["final_metric"],
        "e2e_final": base["final_metric"],
    }
    matrix = [
        {
            "method": method,
            "variant": variant,
            "two_way_share_of_float_e2e": two_way(r) / two_way(base),
            "bytes_up_share_of_float_e2e": r["total_bytes_up"] / base["total_bytes_up"],
            "final_metric": r["final_metric"],
            "accuracy_diff_vs_float_e2e": r["final_metric"] - base["final_metric"],
        }
        for (method, variant), r in runs.items()
    ]
    return {"progfed_vs_e2e": headline, "compression_matrix": matrix}


def _simulator_vs_fedml(rounds: int) -> dict[str, Any]:
    """Mean per-round time of our loop and of FedML's FedAvgAPI, same work, tests switched off in both."""
    import torch
    from fedml.simulation.sp.fedavg.fedavg_api import FedAvgAPI

    from fedml_progfed.config import load_config
    from fedml_progfed.runners.federation import build_federation
    from fedml_progfed.runners.standalone import run_rounds

    overrides = [
        "progfed_args.progfed_strategy=e2e", "train_args.momentum=0.0", f"train_args.comm_round={rounds}",
        f"validation_args.frequency_of_the_test={rounds + 1}",
    ]
    sections, config = load_config(QUICKSTART, overrides)

    engine: list[float] = []

    def time_ours() -> list[float]:
        fed = build_federation(config, sections, data)
        fed.aggregator.test_data = None  # as in FedML's loop below: no evaluation in the timed rounds
        run_rounds(fed)
        rows = fed.server.state.ledger.rows[1:]  # round 0 warms caches, measures FLOPs
        # the engine's own time: everything but the clients' local training (there is no test)
        engine.extend(r["wall_s"] - r["client_compute_s"] for r in rows)
        return [r["wall_s"] for r in rows]

    fed = build_federation(config, sections)
    data = fed.data

    class TimedFedAvg(FedAvgAPI):
        """FedML's own loop; only evaluation is switched off and round ends are timestamped."""

        stamps: list[float] = []

        def _local_test_on_all_clients(self, round_idx):
            return None

        def _aggregate(self, w_locals):
            result = super()._aggregate(w_locals)
            self.stamps.append(time.perf_counter())
            return result

    from fedml_progfed.fedml_plugin.offline import init_fedml_offline

    args = fed.args
    args.dataset = config.dataset
    args.training_type, args.backend = "simulation", "sp"
    # FedAvgAPI reports to FedML's MLOps unless FedML was initialised with using_mlops off.
    args = init_fedml_offline(args)
    args.device = torch.device("cpu")
    def time_fedml() -> list[float]:
        model = build_federation(config, sections, data).server.model.cpu()
        api = TimedFedAvg(args, torch.device("cpu"), data.as_list(), model)
        api.stamps = []
        started = time.perf_counter()
        api.train()
        stamps = [started, *api.stamps]
        return [b - a for a, b in zip(stamps, stamps[1:])][1:]

    # Alternate the two (A B A B) so drift in the machine's speed hits both alike.
    ours, theirs = [], []
    for _ in range(2):
        ours += time_ours()
        theirs += time_fedml()
    ours_mean, theirs_mean = mean(ours), mean(theirs)
    return {
        "rounds": rounds,
        "clients_per_round": config.client_num_per_round,
        "ours_mean_round_s": ours_mean,
        "engine_mean_round_s": mean(engine),
        "engine_median_round_s": median(engine),
        "fedml_mean_round_s": theirs_mean,
        "simulator_speed_ratio_vs_fedml": ours_mean / theirs_mean,
        "median_ratio": median(ours) / median(theirs),
    }


def _wire_efficiency() -> list[dict[str, Any]]:
    """Encoded bytes of a real full-model upload (header excluded) / bits-per-value x values, per codec."""
    import math

    import torch

    from fedml_progfed.comm.codecs import information_bits, parse_spec
    from fedml_progfed.comm.messages import HEADER_KEY, METRICS_KEY, nbytes
    from fedml_progfed.config import RunConfig
    from fedml_progfed.core.staged_model import active_names, initialize
    from fedml_progfed.engine import build_client, build_server
    from fedml_progfed.models import build_model
    from fedml_progfed.tasks.classification import ClassificationTask

    rows = []
    g = torch.Generator().manual_seed(0)
    batch = [(torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g))]
    for spec in WIRE_SPECS:
        config = RunConfig().replace(
            comm_round=1, client_num_in_total=1, client_num_per_round=1, progfed={"strategy": "e2e", "compression_up": spec}
        )
        make = lambda: initialize(build_model("convnet", (1, 28, 28), 10, 4), 0)  # noqa: E731
        server, client = build_server(config, make(), ClassificationTask()), build_client(config, make(), ClassificationTask())
        client.receive(server.start_round().wire)
        client.train(batch, torch.device("cpu"), 0)  # a realistic update: one local step
        message = client.upload()
        sizes = [t.numel() for n, t in client.model.state_dict().items() if n in active_names(client.model, 4)]
        ideal_bits = sum(information_bits(parse_spec(spec), n) for n in sizes)
        encoded = nbytes(message) - nbytes({k: message[k] for k in (HEADER_KEY, METRICS_KEY)})
        rows.append(
            {
                "spec": spec,
                "values": sum(sizes),
                "encoded_bytes": encoded,
                "header_bytes": nbytes({k: message[k] for k in (HEADER_KEY, METRICS_KEY)}),
                "information_bytes": math.ceil(ideal_bits / 8),
                "wire_efficiency": encoded * 8 / ideal_bits,
            }
        )
    return rows


def format_report(result: dict[str, Any]) -> str:
    lines = []
    if "progfed_vs_e2e" in result:
        h = result["progfed_vs_e2e"]
        lines += [
            "(a) ProgFed vs e2e (quickstart setup)",
            f"    two-way bytes ratio {h['bytes_ratio']:.3f}   client FLOPs ratio {h['flops_ratio']:.3f}   "
            f"wall time ratio {h['wall_ratio']:.3f}   accuracy {100 * h['progfed_final']:.2f} % vs "
            f"{100 * h['e2e_final']:.2f} % ({100 * h['accuracy_diff']:+.2f} points)",
            "(b) compression matrix (uplink codec; shares of float e2e two-way bytes)",
            f"    {'method':8} {'variant':12} {'two-way share':>14} {'up share':>9} {'final %':>8} {'vs float e2e':>13}",
        ]
        for r in result["compression_matrix"]:
            lines.append(
                f"    {r['method']:8} {r['variant']:12} {100 * r['two_way_share_of_float_e2e']:13.2f}% "
                f"{100 * r['bytes_up_share_of_float_e2e']:8.2f}% {100 * r['final_metric']:8.2f} "
                f"{100 * r['accuracy_diff_vs_float_e2e']:+12.2f}p"
            )
    if "simulator" in result:
        s = result["simulator"]
        lines += [
            "(c) standalone simulator vs FedML FedAvgAPI (same model, data, rounds, clients; no evaluation)",
            f"    ours {s['ours_mean_round_s']:.3f} s/round   FedML {s['fedml_mean_round_s']:.3f} s/round   "
            f"simulator_speed_ratio_vs_fedml {s['simulator_speed_ratio_vs_fedml']:.3f}",
            f"    engine's own time (all but local training; no test) {s['engine_mean_round_s']:.4f} s/round mean, "
            f"{s['engine_median_round_s']:.4f} median ({100 * s['engine_mean_round_s'] / s['ours_mean_round_s']:.1f} % "
            f"of a round)",
        ]
    if "wire" in result:
        lines.append("(d) wire efficiency of a full-model upload (encoded / information-theoretic)")
        for w in result["wire"]:
            lines.append(
                f"    {w['spec']:10} {w['encoded_bytes']:>9,} B / {w['information_bytes']:>9,} B = {w['wire_efficiency']:.4f}"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedml_progfed.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and codecs (under 10 minutes on 2 cores)")
    parser.add_argument("--out", required=True, help="folder for bench.json, bench.txt and the runs")
    parser.add_argument("--parts", default="matrix,simulator,wire", help="which parts to run (comma-separated)")
    parser.add_argument("--protocol", action="store_true",
                        help="ProgFed vs e2e on the CIFAR-10 protocol of Table 7, 3 seeds (on 2 cores an e2e round takes "
                             "about 18 s: 50 rounds of 4 variants and 3 seeds take hours; see --protocol-rounds "
                             "and --protocol-variants)")
    parser.add_argument("--protocol-rounds", type=int, default=50, help="T of the protocol runs (default 50)")
    parser.add_argument("--protocol-variants", default="progfed,progfed-extra-warmup,progfed-lr-restart",
                        help="protocol variants besides the e2e baseline, comma-separated (default: all three)")
    parser.add_argument("--profl", action="store_true",
                        help="ProFL against e2e (no budgets), e2e-exclusive and ProgFed under the same budgets, data and "
                             "seeds (3 seeds, mean ± std; --cf defaults to config/profl_quickstart.yaml)")
    parser.add_argument("--profl-rounds", type=int, default=None, help="T of the --profl runs (default: the config's)")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of --profl, --privacy and --compression (comma-separated)")
    parser.add_argument("--privacy", action="store_true",
                        help="ProgFed vs e2e with client-level DP at the same (epsilon, delta), and both without DP, "
                             "3 seeds (--cf defaults to config/fashion_mnist_dp.yaml)")
    parser.add_argument("--privacy-rounds", type=int, default=None, help="T of the --privacy runs (default: the config's)")
    parser.add_argument("--compression", action="store_true",
                        help="ProgFed and e2e with every codec in both directions on the protocol bench's setting "
                             "(ratios against float e2e; --cf defaults to config/quickstart.yaml)")
    parser.add_argument("--compression-rounds", type=int, default=40, help="T of the --compression runs (default 40)")
    parser.add_argument("--compression-epochs", type=int, default=None,
                        help="local epochs of the --compression runs (default: the protocol's 5)")
    parser.add_argument("--codecs", default=",".join(("float", "lq8", "lq4", "lq2", "sp25", "sp10", "lq8+sp25", "lq8+sp10")),
                        help="codecs of --compression (comma-separated; float, the baseline, always runs)")
    parser.add_argument("--cf", default=None, help="config whose data and model the protocol (or --profl) uses")
    ns = parser.parse_args(argv)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    if ns.profl:
        from fedml_progfed.profl_bench import format_profl_bench, run_profl_bench

        cf = Path(ns.cf) if ns.cf else PROFL_QUICKSTART
        seeds = tuple(int(s) for s in ns.seeds.split(","))
        extra = ("train_args.epochs=1", "validation_args.frequency_of_the_test=2") if ns.quick else ()
        result = run_profl_bench(cf, out, ns.profl_rounds, seeds, extra)
        print(format_profl_bench(result))
        return 0
    if ns.privacy:
        from fedml_progfed.privacy_bench import format_privacy_bench, run_privacy_bench

        cf = Path(ns.cf) if ns.cf else QUICKSTART.with_name("fashion_mnist_dp.yaml")
        result = run_privacy_bench(cf, out, ns.privacy_rounds, tuple(int(s) for s in ns.seeds.split(",")))
        print(format_privacy_bench(result))
        return 0
    if ns.compression:
        from fedml_progfed.compression_bench import format_compression_bench, run_compression_bench

        # quick: a smoke run of the same code (one local epoch, 10 clients)
        extra = ("train_args.epochs=1", "train_args.client_num_in_total=10", "train_args.client_num_per_round=4") \
            if ns.quick else ()
        if ns.compression_epochs is not None:
            extra = (*extra, f"train_args.epochs={ns.compression_epochs}")
        result = run_compression_bench(Path(ns.cf) if ns.cf else QUICKSTART, out, ns.compression_rounds,
                                       tuple(int(s) for s in ns.seeds.split(",")), tuple(ns.codecs.split(",")),
                                       extra=extra)
        print(format_compression_bench(result))
        return 0
    ns.cf = ns.cf or str(QUICKSTART)
    if ns.protocol:
        from fedml_progfed.protocol_bench import format_protocol, run_protocol

        if ns.quick:  # a smoke run of the same code: few rounds, two seeds, one local epoch, 20 clients
            result = run_protocol(Path(ns.cf), out, rounds=4, seeds=(0, 1), test_every=1, extra=(
                "train_args.epochs=1", "train_args.client_num_in_total=10", "train_args.client_num_per_round=4"))
        else:
            result = run_protocol(Path(ns.cf), out, rounds=ns.protocol_rounds, seeds=(0, 1, 2), test_every=2,
                                  variants=tuple(ns.protocol_variants.split(",")))
        print(format_protocol(result))
        return 0
    parts = set(ns.parts.split(","))
    result: dict[str, Any] = {"quick": ns.quick}
    started = time.perf_counter()
    if "wire" in parts:
        result["wire"] = _wire_efficiency()
    if "simulator" in parts:
        result["simulator"] = _simulator_vs_fedml(rounds=10 if ns.quick else 30)
    if "matrix" in parts:
        result.update(_matrix(out, ns.quick))
    result["bench_wall_s"] = time.perf_counter() - started
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    report = format_report(result)
    (out / "bench.txt").write_text(report + "\n")
    print(report)
    print(f"bench took {result['bench_wall_s']:.0f} s -> {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
