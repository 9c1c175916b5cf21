"""``fedml-progfed run | compare | describe | provision``: parse, load the config, call the runners.

Errors the user can fix end in one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from fedml_progfed.errors import ProgFedError

log = logging.getLogger("fedml_progfed")


def _add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--cf", required=required, help="FedML-style YAML config file")
    parser.add_argument(
        "--set", dest="overrides", action="extend", nargs="+", default=[], metavar="SECTION.KEY=VALUE",
        help="override config values, e.g. --set train_args.comm_round=20 progfed_args.progfed_stages=3",
    )


def _default_out(cf: str, suffix: str) -> Path:
    return Path("runs") / f"{Path(cf).stem}-{suffix}"


def _setup_logging(quiet: bool) -> None:
    """Log lines go through tqdm.write so they do not break the progress bar."""
    from tqdm.auto import tqdm

    class TqdmHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            tqdm.write(self.format(record), file=sys.stderr)

    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    logging.getLogger("fedml_progfed.rounds").setLevel(logging.WARNING)  # the progress bar shows rounds


def _out_folder(ns: argparse.Namespace, kind: str) -> Path:
    """The run folder: ``--resume DIR``, else ``--out``, else ``runs/<config>-<kind>``."""
    if ns.resume is not None:
        if ns.out and Path(ns.out) != Path(ns.resume):
            raise ProgFedError(f"--resume {ns.resume} and --out {ns.out} name different folders; give only --resume")
        return Path(ns.resume)
    return Path(ns.out) if ns.out else _default_out(ns.cf, kind)


def _add_output_args(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--out", help=f"results folder (default {default}); must be empty or new")
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last complete checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or info logs")


def cmd_run(ns: argparse.Namespace) -> int:
    from fedml_progfed.runners.experiment import run_experiment

    if ns.dry_run:
        from fedml_progfed.config import load_config
        from fedml_progfed.runners.dry_run import dry_run

        print(dry_run(ns.cf, *load_config(ns.cf, ns.overrides)))
        return 0

    out = _out_folder(ns, "run")
    summary = run_experiment(
        ns.cf, ns.overrides, out, show_progress=not ns.quiet, overwrite=ns.overwrite, resume=ns.resume is not None
    )
    print(
        f"final {summary['metric_name']} {100 * (summary['final_metric'] or 0):.2f} %  "
        f"best {100 * (summary['best_metric'] or 0):.2f} %  two-way {summary['total_bytes'] / 1e6:.2f} MB  "
        f"client {summary['total_flops'] / 1e9:.2f} GFLOPs  -> {out}"
    )
    return 0


def cmd_compare(ns: argparse.Namespace) -> int:
    from fedml_progfed.runners.experiment import run_comparison

    out = _out_folder(ns, "compare")
    variants = [v.strip() for v in ns.variants.split(",") if v.strip()] if ns.variants else None
    methods = [m.strip() for m in ns.methods.split(",") if m.strip()]
    table = run_comparison(
        ns.cf, ns.overrides, out, show_progress=not ns.quiet, variants=variants, methods=methods,
        overwrite=ns.overwrite, resume=ns.resume is not None,
    )
    print(table)
    print(f"\nresults in {out}")
    return 0


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ProgFedError(f"--input-shape: {text!r} must be comma-separated integers, e.g. 3,32,32") from None
    return shape


def cmd_describe(ns: argparse.Namespace) -> int:
    from fedml_progfed.config import RunConfig, flatten, load_config
    from fedml_progfed.describe import describe_model, describe_privacy, format_description, format_privacy

    if ns.cf:
        sections, _ = load_config(ns.cf, ns.overrides)
    else:
        sections = {"model_args": {}, "train_args": {}, "progfed_args": {}}
    flat = flatten(sections)
    model = ns.model or flat.get("model")
    if not model:
        raise ProgFedError("describe: give --model NAME or --cf CONFIG")
    if ns.rounds is not None:
        flat["comm_round"] = ns.rounds
    if ns.stages is not None:
        flat["progfed_stages"] = ns.stages
    if ns.schedule:
        flat["progfed_schedule"] = ns.schedule
    if ns.strategy:
        flat["progfed_strategy"] = ns.strategy
    if ns.growth:
        flat["unet_growth"] = ns.growth
    if ns.update:
        flat["progfed_update"] = ns.update
    if ns.warmup_rounds is not None:
        flat["progfed_warmup_rounds"] = ns.warmup_rounds
    if ns.warmup_mode:
        flat["progfed_warmup_mode"] = ns.warmup_mode
    flat["model"] = model
    config = RunConfig.from_flat(flat)
    if ns.input_shape:
        input_shape, num_classes = _parse_shape(ns.input_shape), ns.num_classes
    else:
        if not ns.cf:
            raise ProgFedError("describe: give --input-shape C,H,W (or --cf CONFIG to read it from the data set)")
        from fedml_progfed.data import load_federated_data, static_shape

        # The data set's spec says the shape from the config alone; only a spec that
        # cannot (a user-registered one without ``shape``) makes us load the data.
        shape = static_shape(config)
        if shape is None:
            data = load_federated_data(config)
            shape = (tuple(data.input_shape), data.num_classes)
        input_shape, num_classes = shape[0], ns.num_classes or shape[1]
    if not num_classes:
        raise ProgFedError("--num-classes: give the number of classes (or --cf with a known dataset)")
    if config.progfed.strategy == "profl":
        from fedml_progfed.describe import describe_profl, format_profl

        info = describe_profl(model, input_shape, num_classes, config, ns.batch_size or config.batch_size, ns.measure)
        text = format_profl(info)
    else:
        info = describe_model(model, input_shape, num_classes, config)
        text = format_description(info)
    privacy = describe_privacy(config, int(info.get("total_rounds", config.comm_round)))
    if privacy is not None:
        info["privacy"] = privacy
        text += "\n" + format_privacy(privacy)
    print(json.dumps(info, indent=2) if ns.json else text)
    return 0


def cmd_make_brats_demo(ns: argparse.Namespace) -> int:
    from fedml_progfed.data.brats_demo import write_brats_demo

    shape = _parse_shape(ns.shape)
    paths = write_brats_demo(ns.out, ns.cases, shape=shape, seed=ns.seed)
    print(
        f"wrote {len(paths)} SYNTHETIC BraTS-layout cases ({'x'.join(map(str, shape))} voxels) to {ns.out}: "
        f"demo data for pipelines and tests, not real MRI; point data_args.data_cache_dir at real BraTS for research"
    )
    return 0


def cmd_provision(ns: argparse.Namespace) -> int:
    from fedml_progfed.runners.cross_silo.provision import provision

    out = Path(ns.out)
    done = provision(ns.cf, out, ns.overrides, rank=ns.rank, force=ns.force)
    print(f"{'wrote' if done.new_ca else 'reused'} the CA: {done.ca_cert} {done.ca_key}")
    for verb, paths in (("wrote", done.written), ("kept", done.kept)):
        if paths:
            print(f"{verb} " + " ".join(map(str, paths)) + (" (already there; --force rewrites them)" if verb == "kept" else ""))
    print(
        f"use: comm_args: progfed_tls_ca: {out / 'ca.crt'}, progfed_tls_cert: {out / 'rank-{rank}.crt'}, "
        f"progfed_tls_key: {out / 'rank-{rank}.key'} (each party's --rank picks its files); give party R ca.crt, "
        f"rank-R.crt and rank-R.key; ca.key stays with whoever provisions (it signs new parties), never copied to the silos"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedml-progfed", description="Progressive federated training on FedML (ProgFed).")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train one configuration and write a results folder")
    _add_config_args(run)
    _add_output_args(run, "runs/<config>-run")
    run.add_argument(
        "--dry-run", action="store_true",
        help="validate the config, check the data files exist, build the model and print a summary; train nothing",
    )
    run.set_defaults(func=cmd_run)

    compare = sub.add_parser("compare", help="methods (ProgFed, ProFL, e2e) on identical seeds, data and sampling")
    _add_config_args(compare)
    _add_output_args(compare, "runs/<config>-compare")
    compare.add_argument(
        "--variants", help="uplink compression variants to compare, e.g. float,lq8,lq8+sp25 (default: the config's)"
    )
    compare.add_argument(
        "--methods", default="e2e,progfed",
        help="methods to compare: e2e (no budgets), e2e-exclusive (ExclusiveFL: e2e under the memory budgets), "
             "progfed, profl, allsmall, heterofl, depthfl or a ProgFed update strategy (default e2e,progfed; the "
             "baseline of the cost ratios is e2e-exclusive when it runs, else e2e)",
    )
    compare.set_defaults(func=cmd_compare)

    describe = sub.add_parser("describe", help="stage sizes, FLOPs and communication ratio, no data or training")
    _add_config_args(describe, required=False)
    describe.add_argument("--model", help="model name (see the registry)")
    describe.add_argument("--input-shape", help="C,H,W (C,D,H,W for 3D models), e.g. 3,32,32")
    describe.add_argument("--num-classes", type=int)
    describe.add_argument("--stages", type=int)
    describe.add_argument("--rounds", type=int)
    describe.add_argument("--schedule", help="rounds per stage, e.g. 250,250,250,1250")
    describe.add_argument("--strategy", help="progfed (default), e2e or profl")
    describe.add_argument("--growth", help="U-Net growth: symmetric (default) or asymmetric")
    describe.add_argument("--update", help="ProgFed Table 6 strategy: progressive (default), layerwise, partial, mixed, random")
    describe.add_argument("--warmup-rounds", type=int, help="warm-up rounds after each growth (default 0)")
    describe.add_argument("--warmup-mode", help="within (inside T_s, default) or extra (outside T, the authors' code)")
    describe.add_argument("--batch-size", type=int, help="ProFL: batch size of the memory estimate (default: the config's)")
    describe.add_argument("--measure", action="store_true", help="ProFL: also measure each step's peak (one training step each)")
    describe.add_argument("--json", action="store_true", help="print JSON")
    describe.set_defaults(func=cmd_describe)

    demo = sub.add_parser("make-brats-demo", help="write SYNTHETIC cases in the exact BraTS NIfTI layout")
    demo.add_argument("--out", required=True, help="folder to write the case folders into")
    demo.add_argument("--cases", type=int, required=True, help="number of cases")
    demo.add_argument("--shape", default="64,64,64", help="volume shape X,Y,Z (default 64,64,64)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_make_brats_demo)

    prov = sub.add_parser("provision", help="a CA and one certificate and key per rank, for gRPC's mutual TLS")
    _add_config_args(prov)
    prov.add_argument("--out", required=True, help="folder for ca.crt/ca.key and rank-R.crt/.key (a CA already there is reused)")
    prov.add_argument("--rank", type=int, help="write only this rank's certificate and key (e.g. a party added later)")
    prov.add_argument("--force", action="store_true", help="rewrite party files already there (the CA is kept)")
    prov.set_defaults(func=cmd_provision)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    _setup_logging(getattr(ns, "quiet", False))
    func: Callable[[argparse.Namespace], int] = ns.func
    try:
        return func(ns)
    except ProgFedError as exc:
        from fedml_progfed.config import explain

        print(f"error: {explain(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _release_run_folders()


def _release_run_folders() -> None:
    """The command is over: its run folders are free (a process calling ``main`` again may be another run)."""
    from fedml_progfed.runners.run_dir import release_run_locks

    release_run_locks()


if __name__ == "__main__":
    sys.exit(main())
