"""`hypermoe conformance`: run the conformance suite against an implementation, or rebuild the cases.

    hypermoe conformance --impl ref|torch|torch-cuda|onnx|onnx-cuda|MODULE:FUNCTION [--dtype float32[,bfloat16...]]
                         [--cases PATTERN[,PATTERN...]] [--xfails FILE] [--report FILE.json]
    hypermoe conformance --list                      # the cases, their tags and margins
    hypermoe conformance --regenerate [--check]      # rebuild the cases from ref/ (or compare a rebuild)

Exit status: 0 when every case that ran passed or failed as listed in --xfails; 1 on any unexpected
failure or unexpected pass of an xfail; 2 on a usage or integrity error (missing or tampered case file,
a pattern that matches nothing, an unknown implementation or dtype).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "conformance", help="check an implementation against the golden cases (ref, torch, onnx or MODULE:FUNCTION)",
        description=__doc__.split("\n\n")[0] + " Cases, tolerances and the plug-in interface: conformance/README.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--impl", default="ref",
                   help="ref | torch | torch-cuda | onnx | onnx-cuda | MODULE:FUNCTION (default ref)")
    p.add_argument("--dtype", default="float32",
                   help="comma-separated: float64, float32, float16, bfloat16 (default float32)")
    p.add_argument("--cases", default=None, metavar="PATTERN",
                   help="comma-separated glob(s) over case ids, e.g. 'tie_*,stack3' (default: all)")
    p.add_argument("--xfails", default=None, metavar="FILE",
                   help="expected failures: one 'CASE_GLOB[@DTYPE]  # reason' per line")
    p.add_argument("--report", default=None, metavar="FILE.json", help="also write the full report as JSON")
    p.add_argument("--force", action="store_true", help="replace an existing --report file (default: refuse it)")
    p.add_argument("--cases-dir", default=None, help="folder with manifest.json and the .npz cases (default: the package's)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--regenerate", action="store_true", help="rebuild every case from ref/ into --cases-dir")
    p.add_argument("--check", action="store_true", help="with --regenerate: compare a rebuild instead of writing")
    p.add_argument("--quiet", action="store_true", help="print only failures and the totals")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from conformance import generate, runner
    from conformance.suite import CASES_DIR, load_manifest
    from ref.files import atomic_output, check_output

    cases_dir = Path(args.cases_dir) if args.cases_dir else CASES_DIR
    if args.check and not args.regenerate:
        raise ValueError("--check goes with --regenerate")
    if args.regenerate:
        return generate.main(["--out", str(cases_dir)] + (["--check"] if args.check else []))
    if args.list:
        manifest = load_manifest(cases_dir)
        print(f"suite {manifest['suite_version']} (spec {manifest['spec_version']}), {len(manifest['cases'])} cases in {cases_dir}")
        for c in manifest["cases"]:
            skips = [d for d, v in c["dtypes"].items() if v["skip"]]
            m = lambda v: "none" if v is None else f"{v:.3g}"  # noqa: E731  (None: no k-th/(k+1)-th boundary)
            print(f"{c['id']:<22} {','.join(c['tags']):<48} routing margin {m(c['routing_margin']):<8} "
                  f"order margin {m(c['order_margin']):<8}{'  skipped in ' + ','.join(skips) if skips else ''}")
        return 0
    if args.report:
        check_output(args.report, force=args.force)  # before the run, not after it
    report = runner.run(args.impl, args.dtype, args.cases, args.xfails, cases_dir)
    table = runner.format_table(report)
    if args.quiet:
        lines = table.splitlines()
        keep = [ln for ln in lines[2:] if " fail " in ln or " unexpected-pass " in ln]
        table = "\n".join(lines[:2] + keep + lines[-3:])
    print(table)
    if args.report:
        with atomic_output(args.report, force=args.force) as tmp:
            tmp.write_text(json.dumps(report, indent=1, default=float) + "\n")
        print(f"report written to {args.report}")
    return report["exit_status"]
