"""Speculative decoding side by side (``gmner bench speculation``): gmner_rt with and without
prompt-lookup drafts, onnxruntime-genai, and HF ``generate`` with and without
``prompt_lookup_num_tokens``, on the same requests in one run.

    gmner bench speculation --bundle B --model M --data D --images D/images --think on
    gmner bench speculation --preset bench-small --limit 3 --max-new-tokens 64 --threads 1
    python -m gmner.bench.speculation ...   (the same flags)

Every request is run by every variant in turn (the gmner_rt and onnxruntime-genai variants in
an order rotated per request, then HF's), so that all variants see the same load on a shared
machine; figures are ratios measured in this one run. Variants: ``gmner_rt`` (``extract``,
constrained as shipped) with ``speculate`` False/True; ``gmner_rt unconstrained`` False/True
(no grammar: the same work as HF); with the peers (``--peers``, which need the source
checkpoint: ``--model``, or the ``--preset``'s), ``onnxruntime-genai`` and ``onnxruntime-genai
unconstrained`` (its model builder's decoder behind the same ``extract``, one token per call)
and ``hf`` greedy ``generate`` with and without ``prompt_lookup_num_tokens`` (unconstrained).

Same tokens: each variant's ids must equal its reference's (:data:`REFERENCE`: the grammar
variants gmner_rt's, the unconstrained ones gmner_rt unconstrained's); the report says where
they first differ and the command fails after writing it. Per variant: output tokens,
decoder calls per output token (the prefill not counted), output tokens per call (each call's
chosen token, the tokens the grammar forced and the drafts kept), drafted and accepted tokens,
decode tokens/s (tokens over the time after the prefill), its ratio to the variant without
speculation and to onnxruntime-genai's, end-to-end latency (median), and for gmner_rt's loop
where the decode time goes (decoder calls, choosing, drafting, the rest). It knows nothing
about how a system decodes (:mod:`.speculation_peers`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gmner.runtime.evaluate import tweet_images
from gmner.runtime.extract import positive_int
from gmner.runtime.timing import bench_pairs

import gmner_rt
from gmner_rt.data import load_split
from gmner_rt.errors import GmnerError, InputError

from .peers import DEFAULT_CACHE, first_difference, prepare_preset
from .speculation_peers import STAGES, Decoded, HfPeer, extract_decoded, ortgenai_extractor

log = logging.getLogger(__name__)

__all__ = [
    "REFERENCE",
    "SpeculationConfig",
    "Tally",
    "add_arguments",
    "config_from_args",
    "failed_checks",
    "format_table",
    "main",
    "run",
    "run_command",
]

PEERS = ("hf", "ortgenai")
_GMNER_RT = {
    "gmner_rt": {"speculate": False},
    "gmner_rt + speculation": {"speculate": True},
    "gmner_rt unconstrained": {"constrained": False, "speculate": False},
    "gmner_rt unconstrained + speculation": {"constrained": False, "speculate": True},
}
_ORTGENAI = {
    "onnxruntime-genai": {"speculate": False},
    "onnxruntime-genai unconstrained": {"constrained": False, "speculate": False},
}
#: variant -> the variant whose ids it must equal.
REFERENCE = {
    "gmner_rt + speculation": "gmner_rt",
    "gmner_rt unconstrained + speculation": "gmner_rt unconstrained",
    "onnxruntime-genai": "gmner_rt",
    "onnxruntime-genai unconstrained": "gmner_rt unconstrained",
    "hf": "gmner_rt unconstrained",
    "hf + prompt lookup": "gmner_rt unconstrained",
}
#: variant -> (the same without speculation, onnxruntime-genai doing the same work).
_BASELINES = {
    "gmner_rt": (None, "onnxruntime-genai"),
    "gmner_rt + speculation": ("gmner_rt", "onnxruntime-genai"),
    "gmner_rt unconstrained": (None, "onnxruntime-genai unconstrained"),
    "gmner_rt unconstrained + speculation": (
        "gmner_rt unconstrained",
        "onnxruntime-genai unconstrained",
    ),
    "hf + prompt lookup": ("hf", None),
}


@dataclass(frozen=True)
class SpeculationConfig:
    """What ``gmner bench speculation`` measures (each field is the flag of its name)."""

    bundle: Path | None = None
    model: Path | None = None
    preset: str | None = None
    peers: tuple[str, ...] = PEERS
    data: Path | None = None
    images: Path | None = None
    split: str = "test"
    limit: int | None = None
    threads: int | None = None
    think: str = "on"
    provider: str | None = None
    max_new_tokens: int = 256
    lookup: int = 10
    cache: Path = DEFAULT_CACHE

    def __post_init__(self) -> None:
        if (self.bundle is None) == (self.preset is None):
            raise InputError("--bundle / --preset: give exactly one of them")
        if self.preset is not None and self.model is not None:
            raise InputError("--model: not with --preset (the preset builds its own checkpoint)")
        unknown = [p for p in self.peers if p not in PEERS]
        if unknown:
            raise InputError(f"--peers: expected none or some of {','.join(PEERS)}, got {unknown}")
        if self.peers and self.bundle is not None and self.model is None:
            raise InputError(
                f"--model: the peers {','.join(self.peers)} need the bundle's source checkpoint "
                "(or --peers none)"
            )
        if self.provider not in (None, "cpu", "cuda"):
            raise InputError(f"--provider: expected cpu or cuda, got {self.provider!r}")
        if "ortgenai" in self.peers and self.provider == "cuda":
            raise InputError("--peers: ortgenai runs on the CPU only here; --peers hf with cuda")
        if (self.data is None) != (self.images is None):
            raise InputError("--data / --images: give both (a data folder and its images)")
        if self.think not in ("on", "off", "auto"):
            raise InputError(f"--think: expected on, off or auto, got {self.think!r}")
        for flag, value in (
            ("--limit", self.limit),
            ("--threads", self.threads),
            ("--max-new-tokens", self.max_new_tokens),
            ("--lookup", self.lookup),
        ):
            if value is not None and value < 1:
                raise InputError(f"{flag}: must be >= 1, got {value}")


@dataclass
class Tally:
    """One variant's sums over the requests."""

    name: str
    ids: list[list[int]] = field(default_factory=list)
    decoder_calls: int = 0  # after the prefill
    drafted: int | None = None
    accepted: int | None = None
    decode_s: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    def add(self, decoded: Decoded) -> None:
        self.ids.append(decoded.ids)
        self.decoder_calls += decoded.decoder_calls
        self.decode_s += decoded.decode_s
        self.latencies.append(decoded.total_s)
        if decoded.drafted is not None:
            self.drafted = (self.drafted or 0) + decoded.drafted
            self.accepted = (self.accepted or 0) + (decoded.accepted or 0)
        for stage, seconds in decoded.stages.items():
            self.stages[stage] = self.stages.get(stage, 0.0) + seconds

    def figures(self) -> dict:
        tokens = sum(len(ids) for ids in self.ids)
        out = {
            "variant": self.name,
            "tokens": tokens,
            "decoder_calls": self.decoder_calls,
            "decoder_calls_per_token": self.decoder_calls / max(tokens, 1),
            "tokens_per_call": tokens / max(self.decoder_calls, 1),
            "drafted": self.drafted,
            "accepted": self.accepted,
            "decode_tokens_per_s": tokens / self.decode_s if self.decode_s else 0.0,
            "e2e_ms_median": 1000 * float(np.median(self.latencies)) if self.latencies else 0.0,
        }
        if self.stages:  # where gmner_rt's decode time goes, in ms per output token
            per_token = {k: 1000 * self.stages.get(k, 0.0) / max(tokens, 1) for k in STAGES}
            per_token["other"] = 1000 * self.decode_s / max(tokens, 1) - sum(per_token.values())
            out["decode_ms_per_token"] = per_token
        return out


def _pairs(config: SpeculationConfig) -> list[tuple[object, str]]:
    if config.data is None:
        return bench_pairs(config.limit or 4)
    tweets = load_split(config.data, config.split)[: config.limit]
    found = tweet_images(tweets, [config.images], skip_missing=False)
    return [(path, tweet.text) for tweet, path in found]


def _model_and_bundle(config: SpeculationConfig) -> tuple[Path | None, Path]:
    if config.preset is None:
        return config.model, config.bundle
    return prepare_preset(config.preset, config.cache)


def _runners(config: SpeculationConfig, model: Path | None, bundle: Path) -> dict:
    """variant -> (extractor, extract options), gmner_rt's and onnxruntime-genai's."""
    extractor = gmner_rt.load(bundle, provider=config.provider, threads=config.threads)
    if not extractor.backend.verifies_drafts:
        raise GmnerError(
            f"--bundle: {bundle} is a format-1 bundle, which cannot verify drafts; "
            f"gmner export upgrade --bundle {bundle} --out NEW writes it as format 2"
        )
    runners = {name: (extractor, options) for name, options in _GMNER_RT.items()}
    if "ortgenai" in config.peers:
        peer = ortgenai_extractor(extractor.bundle, model, config.cache / "peers", config.threads)
        runners.update({name: (peer, options) for name, options in _ORTGENAI.items()})
    return runners


def _decode_all(config: SpeculationConfig, runners: dict, hf: HfPeer | None, pairs) -> dict:
    """Every variant on every request: a :class:`Tally` per variant."""
    base = {"think": config.think, "max_new_tokens": config.max_new_tokens}
    tallies = {name: Tally(name) for name in runners}
    if hf is not None:
        tallies.update({name: Tally(name) for name in ("hf", "hf + prompt lookup")})
    for extractor in {id(e): e for e, _ in runners.values()}.values():  # warm-up, token table
        extractor.extract(pairs[0][0], pairs[0][1], max_new_tokens=16)
    think = config.think != "off"
    for index, (image, text) in enumerate(pairs):
        names = list(runners)
        for name in names[index % len(names) :] + names[: index % len(names)]:
            extractor, options = runners[name]
            tallies[name].add(extract_decoded(extractor, image, text, {**base, **options}))
        if hf is not None:
            new = len(tallies["gmner_rt unconstrained"].ids[-1]) or 1
            tallies["hf"].add(hf.decode(image, text, think, new, None))
            tallies["hf + prompt lookup"].add(hf.decode(image, text, think, new, config.lookup))
        log.info("request %d/%d done", index + 1, len(pairs))
    return tallies


def _ratios(figures: dict) -> None:
    """Each variant's decode and e2e ratio to the same without speculation, and its decode
    ratio to onnxruntime-genai doing the same work (> 1: faster)."""
    for name, (plain, peer) in _BASELINES.items():
        f = figures.get(name)
        if f is None:
            continue
        if plain in figures and figures[plain]["decode_tokens_per_s"]:
            f["decode_speedup"] = f["decode_tokens_per_s"] / figures[plain]["decode_tokens_per_s"]
            f["e2e_speedup"] = figures[plain]["e2e_ms_median"] / f["e2e_ms_median"]
        if peer in figures and figures[peer]["decode_tokens_per_s"]:
            f["decode_vs_ortgenai"] = (
                f["decode_tokens_per_s"] / figures[peer]["decode_tokens_per_s"]
            )


@contextlib.contextmanager
def _torch_threads_kept():
    """Gives the caller back torch's thread count (a bench run inside another program, such
    as a test session, must not leave it changed: later training there would add its partial
    sums in another order)."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run(config: SpeculationConfig) -> dict:
    """Every variant on every request; the figures and the id check."""
    model, bundle = _model_and_bundle(config)
    runners = _runners(config, model, bundle)
    extractor = runners["gmner_rt"][0]
    pairs = _pairs(config)
    with _torch_threads_kept():  # HF's peer sets torch's threads for the process
        hf = HfPeer(model, extractor, config.threads) if "hf" in config.peers else None
        tallies = _decode_all(config, runners, hf, pairs)
    figures = {name: tally.figures() for name, tally in tallies.items()}
    _ratios(figures)
    id_check = {
        name: first_difference(tallies[reference].ids, tallies[name].ids)
        for name, reference in REFERENCE.items()
        if name in tallies
    }
    return {
        "bundle": str(bundle),
        "requests": len(pairs),
        "think": config.think,
        "threads": config.threads,
        "max_new_tokens": config.max_new_tokens,
        "variants": figures,
        "id_check": {
            name: {"against": REFERENCE[name], "difference": d} for name, d in id_check.items()
        },
    }


def failed_checks(report: dict) -> list[str]:
    """``variant: where its ids differ from its reference's`` for every difference."""
    return [
        f"{name} against {check['against']}: {check['difference']}"
        for name, check in report["id_check"].items()
        if check["difference"] is not None
    ]


def _ratio(value: float | None) -> str:
    return f"{value:5.2f}" if value is not None else f"{'-':>5}"


def format_table(report: dict) -> str:
    head = (
        f"{'variant':36} {'tokens':>6} {'calls/tok':>9} {'tok/call':>8} {'drafted':>7} "
        f"{'accepted':>8} {'decode tok/s':>12} {'x':>5} {'x genai':>7} {'e2e ms':>8} {'x':>5} "
        f"{'same ids':>8}"
    )
    rows = [head, "-" * len(head)]
    for f in report["variants"].values():
        check = report["id_check"].get(f["variant"])
        same = "ref" if check is None else "yes" if check["difference"] is None else "NO"
        rows.append(
            f"{f['variant']:36} {f['tokens']:6d} {f['decoder_calls_per_token']:9.3f} "
            f"{f['tokens_per_call']:8.2f} {_count(f['drafted']):>7} {_count(f['accepted']):>8} "
            f"{f['decode_tokens_per_s']:12.1f} {_ratio(f.get('decode_speedup'))} "
            f"{_ratio(f.get('decode_vs_ortgenai')):>7} {f['e2e_ms_median']:8.1f} "
            f"{_ratio(f.get('e2e_speedup'))} {same:>8}"
        )
    rows += ["", "decode ms per token (gmner_rt's loop): decoder calls / choose / draft / rest"]
    for f in report["variants"].values():
        if "decode_ms_per_token" in f:
            ms = f["decode_ms_per_token"]
            rows.append(
                f"  {f['variant']:36} " + " / ".join(f"{ms[k]:.3f}" for k in (*STAGES, "other"))
            )
    return "\n".join(rows)


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


# --- the command -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, *, inherited: tuple[str, ...] = ()) -> None:
    """The flags; those named in ``inherited`` (dests) get no default here, so a value given
    to the parent command (``gmner bench --threads 1 speculation``) is kept."""

    def default(dest: str, value):
        return argparse.SUPPRESS if dest in inherited else value

    model = parser.add_argument_group("model (one of)")
    model.add_argument(
        "--bundle",
        type=Path,
        default=default("bundle", None),
        help="a format-2 bundle (gmner export upgrade writes one)",
    )
    model.add_argument(
        "--preset",
        choices=("tiny", "bench-small"),
        default=default("preset", None),
        help="a random-weight model (cached)",
    )
    model.add_argument(
        "--model",
        type=Path,
        default=default("model", None),
        help="the bundle's source checkpoint (the peers need it)",
    )
    parser.add_argument(
        "--peers",
        default=",".join(PEERS),
        help="comma-separated peers beside gmner_rt: hf, ortgenai, or none (default: %(default)s)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        help="Twitter-GMNER-format folder (default: the bench's synthetic pairs)",
    )
    parser.add_argument("--images", type=Path, help="its image folder (with --data)")
    parser.add_argument("--split", default="test", help="the split of --data (default: test)")
    parser.add_argument("--limit", type=positive_int, help="the first N requests only")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=default("threads", None),
        help="onnxruntime / torch threads",
    )
    parser.add_argument(
        "--think", choices=("on", "off", "auto"), default="on", help="reasoning (default: on)"
    )
    parser.add_argument(
        "--provider",
        choices=("cpu", "cuda"),
        default=default("provider", None),
        help="gmner_rt's provider",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=256,
        help="the most tokens per request (default: %(default)s)",
    )
    parser.add_argument(
        "--lookup",
        type=positive_int,
        default=10,
        help="hf's prompt_lookup_num_tokens (default: %(default)s)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=default("cache", DEFAULT_CACHE),
        help="presets and onnxruntime-genai builds",
    )
    parser.add_argument(
        "--json", type=Path, default=default("json", None), help="also write the figures here"
    )


def config_from_args(args: argparse.Namespace) -> SpeculationConfig:
    peers = tuple(p.strip() for p in args.peers.split(",") if p.strip())
    return SpeculationConfig(
        bundle=args.bundle,
        model=args.model,
        preset=args.preset,
        peers=() if peers == ("none",) else peers,
        data=args.data,
        images=args.images,
        split=args.split,
        limit=args.limit,
        threads=args.threads,
        think=args.think,
        provider=args.provider,
        max_new_tokens=args.max_new_tokens,
        lookup=args.lookup,
        cache=args.cache,
    )


def run_command(args: argparse.Namespace) -> int:
    """Run, print the table, write ``--json``; fail when a variant's ids differ."""
    report = run(config_from_args(args))
    sys.stdout.write(
        f"{report['requests']} requests, think {report['think']}, threads "
        f"{report['threads'] or 'default'}, bundle {report['bundle']} (all variants in one run, "
        "requests interleaved; x: vs the same without speculation; x genai: vs "
        "onnxruntime-genai doing the same work)\n"
    )
    sys.stdout.write(format_table(report) + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    failures = failed_checks(report)
    if failures:
        raise GmnerError("other ids than the reference's: " + "; ".join(failures))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gmner.bench.speculation")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_command(args)
    except GmnerError as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
