"""``load`` a bundle and ``extract`` grounded entities from (image, text) pairs.

The extractor joins the parts: image conversion and preprocessing (:mod:`.vision`), the
prompt (:mod:`.prompt`, the bundle's chat layout) tokenized with ``tokenizers``, greedy
generation (:mod:`.generate`) over a backend, by default constrained to the record grammar of
each request (:mod:`.constraints`), and parsing (:mod:`.records`) with boxes mapped back to the
original image's pixels (:mod:`.geometry`). Whatever the model generates, ``extract`` returns:
unconstrained records that do not parse are reported in ``malformed``.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .answers import records_to_original
from .bundle import TOKENIZER_NAME, Bundle, EngineLimits, load_bundle
from .constraints import RequestConstraint, TokenTable
from .errors import BundleError, InputError
from .generate import GenerationResult, LogitsHook, PromptBatch, VisionSpec, generate
from .geometry import Box, ImageGeometry
from .grammar import AnswerGrammar, GrammarTags
from .images import check_pixel_count
from .mentions import find_spans
from .prompt import render_prompt
from .records import parse_output
from .speculate import SpeculationSettings
from .text_ids import TEXT_SENTINEL, PlainText
from .vision import (
    ImageInput,
    ImageProcessorSettings,
    PreparedImage,
    num_image_tokens,
    prepare_image,
    to_rgb,
)

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_BUNDLE", "Entity", "Extraction", "Extractor", "find_spans", "load"]

#: Where the embedded default bundle lives (shipped with the package).
DEFAULT_BUNDLE = Path(__file__).parent / "models" / "default"
#: Longest accepted text, in tokens (tweets are far shorter; the prompt must fit the context).
MAX_TEXT_TOKENS = 2048
#: Decoded tokens examined for a stop string (each token is at least one character).
_STOP_WINDOW = 16

Think = Literal["on", "off", "auto"]


@dataclass(frozen=True)
class Entity:
    """One extracted entity.

    Attributes:
        mention: the entity's words as the model wrote them.
        type: its type, one of the bundle's labels (unless the model wrote another).
        boxes: ``(x1, y1, x2, y2)`` boxes in the original image's pixels, or None when the
            image does not show it.
        spans: ``(start, end)`` character offsets of the mention's occurrences in the text
            (``text[start:end] == mention``); empty when the text does not contain it.
    """

    mention: str
    type: str
    boxes: tuple[Box, ...] | None
    spans: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Extraction:
    """The result of one ``extract`` call.

    Attributes:
        records: the entities, in generation order.
        think: the model's reasoning, or None.
        raw: the generated text, as decoded.
        malformed: answer segments that did not parse, as written.
        token_ids: the generated token ids (stop token included).
        image_size: the original image's (width, height).
        model_size: the image's (width, height) as the model saw it; ``raw``'s boxes are in
            its pixels.
        timings: seconds per stage (floats: preprocess, vision, prefill, decode, choose:
            picking tokens, the grammar's masks included, total), and counts (ints): generated
            tokens (tokens), decoder calls for the batch, prefill included (steps), tokens
            the grammar forced (forced_tokens), whether the token budget narrowed a choice to
            close the answer in time (budget_limited, 0 or 1), and, for the batch, tokens drafted by
            speculation and those the model accepted (drafted_tokens, accepted_tokens; 0
            without speculation). With speculation, draft: proposing and checking drafts.
    """

    records: tuple[Entity, ...]
    think: str | None
    raw: str
    malformed: tuple[str, ...]
    token_ids: tuple[int, ...]
    image_size: tuple[int, int]
    timings: dict[str, float | int] = field(default_factory=dict)
    model_size: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (lists for tuples)."""
        data = asdict(self)
        data["records"] = [
            {
                **r,
                "boxes": [list(b) for b in r["boxes"]] if r["boxes"] else None,
                "spans": [list(s) for s in r["spans"]],
            }
            for r in data["records"]
        ]
        data["token_ids"] = list(self.token_ids)
        data["image_size"] = list(self.image_size)
        data["model_size"] = list(self.model_size) if self.model_size else None
        return data


@dataclass(frozen=True)
class _Request:
    """One prepared pair: the image ready for the vision graph, the prompt ids, the text."""

    image: PreparedImage
    prompt_ids: list[int]
    text: str

    @property
    def geometry(self) -> ImageGeometry:
        return self.image.geometry

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.image.grid


class Extractor:
    """Extracts grounded entities with one bundle on one backend (see :func:`load`)."""

    def __init__(
        self,
        bundle: Bundle,
        backend,
        *,
        max_text_tokens: int = MAX_TEXT_TOKENS,
        speculation: SpeculationSettings | None = None,
    ):
        from tokenizers import Tokenizer

        self.bundle = bundle
        self.backend = backend
        self.max_text_tokens = max_text_tokens
        #: how ``speculate=True`` drafts (a backend that cannot verify drafts ignores it)
        self.speculation = speculation or SpeculationSettings()
        m = bundle.manifest
        path = bundle.file(TOKENIZER_NAME)
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for a bad file
            raise BundleError(f"{path}: not a readable tokenizers file ({exc})") from None
        self.image_settings = ImageProcessorSettings.from_dict(m.image_processor)
        self.limits = getattr(backend, "limits", None)
        if self.limits is not None:
            self.image_settings = _limit_pixels(self.image_settings, self.limits.max_image_tokens)
        self.vision = VisionSpec(
            image_token_id=m.tokens.image_pad_id,
            merge_size=m.model.vision.spatial_merge_size,
            window_size=m.model.vision.window_size,
            patch_size=m.model.vision.patch_size,
        )
        self._image_pad = self.tokenizer.id_to_token(m.tokens.image_pad_id)
        if self._image_pad is None:
            raise BundleError(f"{bundle.path}: tokenizer.json has no token for image_pad_id")
        g = m.generation
        self.tags = GrammarTags(g.think_open, g.think_close, g.answer_open, g.answer_close)
        self._token_table: TokenTable | None = None
        self.plain_text = PlainText(self.tokenizer)
        if self.plain_text.sentinel_id is None:
            raise BundleError(f"{path}: the tokenizer has no {TEXT_SENTINEL} token (Qwen2-VL's)")

    @property
    def token_table(self) -> TokenTable:
        """Every token's bytes, for constrained decoding (built on first use)."""
        if self._token_table is None:
            started = time.perf_counter()
            vocab = self.bundle.manifest.model.text.vocab_size
            self._token_table = TokenTable.from_tokenizer(self.tokenizer, vocab)
            log.info("token table: %d tokens in %.3f s", vocab, time.perf_counter() - started)
        return self._token_table

    @property
    def labels(self) -> tuple[str, ...]:
        return self.bundle.manifest.labels

    @property
    def provider(self) -> str:
        """The execution provider the decoder runs on: "cpu", "cuda" or "tensorrt"."""
        from .providers import provider_name

        return provider_name(self.backend.decoder.get_providers()[0])

    def placement(self) -> dict[str, dict[str, int] | None]:
        """Graph name -> nodes per execution provider, as onnxruntime placed them (None where
        this onnxruntime cannot say): a GPU run with nodes on the CPU shows here."""
        return self.backend.placement()

    def prompt_ids(self, text: str, grid: Sequence[int], *, think: bool = True) -> list[int]:
        """Token ids of the full prompt for ``text`` and an image of patch grid ``grid``; the
        text is encoded as plain text (:mod:`gmner_rt.text_ids`): control tokens typed in it
        stay text."""
        return self._prompt_and_text(text, grid, think)[0]

    def _prompt_and_text(
        self, text: str, grid: Sequence[int], think: bool
    ) -> tuple[list[int], int]:
        p = self.bundle.manifest.prompt
        image = p.image.replace(
            "{image_pads}", self._image_pad * num_image_tokens(grid, self.vision.merge_size)
        )
        prompt = render_prompt(
            p.chat_template,
            system=p.system,
            image=image,
            instruction_template=p.instruction_think if think else p.instruction_answer_only,
            text=TEXT_SENTINEL,
        )
        spliced = self.plain_text.splice(
            self.tokenizer.encode(prompt, add_special_tokens=False).ids, text
        )
        return spliced.ids, spliced.count

    def _prepare(self, image: ImageInput, text: str, think: bool) -> _Request:
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"text must be a non-empty string, got {text!r}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate (or undecodable command-line bytes)
            raise InputError(
                f"text holds {text[exc.start : exc.end]!r} at character {exc.start}, which is no "
                "character: not valid Unicode (was it read from a file or argument that is not "
                "UTF-8?)"
            ) from None
        rgb = to_rgb(image)
        check_pixel_count(rgb.width, rgb.height)
        prepared = prepare_image(rgb, self.image_settings)
        grid = prepared.grid
        tokens = num_image_tokens(grid, self.vision.merge_size)
        cap = self.bundle.manifest.model.vision.max_image_tokens
        if self.limits is not None and tokens > self.limits.max_image_tokens:
            raise InputError(
                f"image {rgb.width}x{rgb.height} gives {tokens} image tokens; the TensorRT "
                f"profiles allow {self.limits.max_image_tokens} (an extreme aspect ratio; crop "
                "it, or build engines with a larger --max-image-tokens)"
            )
        if cap is not None and tokens > cap:
            raise InputError(
                f"image {rgb.width}x{rgb.height} gives {tokens} image tokens; the bundle "
                f"allows {cap} (model.vision.max_image_tokens: an extreme aspect ratio; crop it)"
            )
        ids, n_text = self._prompt_and_text(text, grid, think)  # the text's one encoding
        if n_text > self.max_text_tokens:
            raise InputError(
                f"text is {n_text} tokens long; the limit is {self.max_text_tokens} "
                "(load(..., max_text_tokens=N) raises it)"
            )
        return _Request(prepared, ids, text)

    def _batch(self, requests: Sequence[_Request]) -> PromptBatch:
        width = max(len(r.prompt_ids) for r in requests)
        pad = self.bundle.manifest.tokens.pad_id
        ids = np.full((len(requests), width), pad, dtype=np.int64)
        mask = np.zeros((len(requests), width), dtype=np.int64)
        for row, r in enumerate(requests):
            ids[row, width - len(r.prompt_ids) :] = r.prompt_ids
            mask[row, width - len(r.prompt_ids) :] = 1
        return PromptBatch(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=np.concatenate([r.image.pixel_values for r in requests]),
            grids=tuple(r.grid for r in requests),
        )

    def prompt_batch(
        self, pairs: Sequence[tuple[ImageInput, str]], *, think: bool = True
    ) -> PromptBatch:
        """The left-padded prompt batch ``extract_batch`` would decode for ``pairs`` (for
        benchmarks and tools that drive :mod:`gmner_rt.generate` themselves)."""
        if not pairs:
            raise InputError("pairs: expected at least one (image, text) pair")
        return self._batch([self._prepare(image, text, think) for image, text in pairs])

    def _stop(self, _row: int, tokens: Sequence[int]) -> bool:
        stops = self.bundle.manifest.generation.stop_strings
        tail = self.tokenizer.decode(list(tokens[-_STOP_WINDOW:]), skip_special_tokens=False)
        return any(s in tail for s in stops)

    def extract(
        self,
        image: ImageInput,
        text: str,
        *,
        think: Think = "auto",
        think_budget: int | None = None,
        constrained: bool = True,
        jump_forward: bool = True,
        max_new_tokens: int | None = None,
        logits_hook: LogitsHook | None = None,
        speculate: bool = False,
    ) -> Extraction:
        """Entities of ``text`` with their boxes in ``image`` (path, bytes, PIL, or array).

        Args:
            think: "on": reason first; "off": answer at once (the answer-only instruction);
                "auto": the model chooses (when constrained; unconstrained it is "on").
            think_budget: reasoning tokens after which the reasoning is closed and the
                answer begins (constrained only).
            constrained: decode under the record grammar: every record parses, its mention is
                whole words of ``text``, its type a bundle label, its boxes inside the image;
                the answer is always closed within ``max_new_tokens``.
            jump_forward: feed the text the grammar forces in one decoder call.
            max_new_tokens: the token limit (default: the bundle's).
            logits_hook: ``hook(logits [B, vocab], state) -> logits``, before the grammar.
            speculate: draft tokens by prompt lookup and verify them in one decoder call
                (:mod:`gmner_rt.speculate`): the same tokens in fewer calls. Needs a bundle of
                format 2; ignored with a ``logits_hook`` and under TensorRT profiles. Off by
                default: on the demo model it was slower than plain decoding (few drafts
                accepted; docs/benchmarks.md).
        """
        return self.extract_batch(
            [(image, text)],
            think=think,
            think_budget=think_budget,
            constrained=constrained,
            jump_forward=jump_forward,
            max_new_tokens=max_new_tokens,
            logits_hook=logits_hook,
            speculate=speculate,
        )[0]

    def extract_batch(
        self,
        pairs: Sequence[tuple[ImageInput, str]],
        *,
        think: Think = "auto",
        think_budget: int | None = None,
        constrained: bool = True,
        jump_forward: bool = True,
        max_new_tokens: int | None = None,
        logits_hook: LogitsHook | None = None,
        batch_size: int | None = None,
        speculate: bool = False,
    ) -> list[Extraction]:
        """``extract`` for several pairs, decoded in left-padded batches.

        Each pair's result equals its own ``extract`` (the batch changes no row's tokens).

        Args:
            batch_size: pairs per decoder batch: a long list runs as consecutive batches of
                at most this many (None: one batch for the whole list). The TensorRT
                profiles' ``max_batch``, when they apply, caps it.
            others: as :meth:`extract`.
        """
        if batch_size is not None:
            try:  # ints and numpy integers; not "4", 2.0 or True
                size = 0 if isinstance(batch_size, bool) else operator.index(batch_size)
            except TypeError:
                size = 0
            if size < 1:
                raise InputError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        if think not in ("on", "off", "auto"):
            raise InputError(f"think: expected 'on', 'off' or 'auto', got {think!r}")
        if think_budget is not None and not constrained:
            raise InputError("think_budget: needs constrained=True")
        if not isinstance(speculate, bool):
            raise InputError(f"speculate: expected True or False, got {speculate!r}")
        if not pairs:
            return []
        m = self.bundle.manifest
        limit = m.generation.default_max_new_tokens if max_new_tokens is None else max_new_tokens
        try:
            if isinstance(limit, bool):
                raise TypeError
            limit = operator.index(limit)  # ints and numpy integers; not "5", 2.0 or True
        except TypeError:
            raise InputError(f"max_new_tokens: expected an integer >= 0, got {limit!r}") from None
        if limit < 0:
            raise InputError(f"max_new_tokens: expected an integer >= 0, got {limit!r}")
        size = min(
            len(pairs) if batch_size is None else size,
            self.limits.max_batch if self.limits is not None else len(pairs),
        )
        out: list[Extraction] = []
        for start in range(0, len(pairs), size):
            chunk = pairs[start : start + size]
            out += self._extract_chunk(
                chunk, think, think_budget, constrained, jump_forward, limit, logits_hook, speculate
            )
        return out

    def _extract_chunk(
        self,
        pairs: Sequence[tuple[ImageInput, str]],
        think: Think,
        think_budget: int | None,
        constrained: bool,
        jump_forward: bool,
        limit: int,
        logits_hook: LogitsHook | None,
        speculate: bool,
    ) -> list[Extraction]:
        m = self.bundle.manifest
        started = time.perf_counter()
        requests = [self._prepare(image, text, think != "off") for image, text in pairs]
        constraints = None
        if constrained:
            # Under TensorRT's profiles, jump-forward only for one row: in a batch the rows'
            # forced runs are padded to the longest, so the cache could outgrow the context.
            jump = jump_forward and (self.limits is None or len(requests) == 1)
            constraints = [self._constraint(r, think, think_budget, jump, limit) for r in requests]
        batch = self._batch(requests)
        self._check_context(batch.input_ids.shape[1], limit)
        preprocess_s = time.perf_counter() - started
        result = generate(
            self.backend,
            batch,
            self.vision,
            max_new_tokens=limit,
            eos_ids=m.tokens.eos_ids,
            pad_id=m.tokens.pad_id,
            stop=None if constrained else self._stop,
            logits_hook=logits_hook,
            constraints=constraints,
            # not under TensorRT profiles: rejected drafts stay in the cache (masked), so it
            # could outgrow the profiles' context
            speculation=self.speculation if speculate and self.limits is None else None,
        )
        total = time.perf_counter() - started
        return [
            self._result(r, tokens, result, preprocess_s, total, c)
            for r, tokens, c in zip(
                requests, result.tokens, constraints or [None] * len(requests), strict=True
            )
        ]

    def _check_context(self, prompt: int, new_tokens: int) -> None:
        """Prompt + new tokens must fit the TensorRT profiles' context."""
        if self.limits is None or prompt + new_tokens <= self.limits.max_context:
            return
        room = self.limits.max_context - prompt
        hint = f"max_new_tokens <= {room}" if room > 0 else "a shorter text or a smaller image"
        raise InputError(
            f"prompt ({prompt} tokens) + max_new_tokens ({new_tokens}) exceeds the TensorRT "
            f"profiles' context of {self.limits.max_context}: use {hint}, or build engines "
            "with a larger --max-context"
        )

    def _constraint(
        self, request: _Request, think: Think, budget: int | None, jump: bool, limit: int
    ) -> RequestConstraint:
        width, height = request.geometry.model_size
        grammar = AnswerGrammar(
            request.text, self.labels, width, height, think=think, tags=self.tags
        )
        constraint = RequestConstraint(
            grammar, self.token_table, think_budget=budget, jump_forward=jump
        )
        needed = constraint.min_tokens()
        if limit < needed:
            raise InputError(
                f"max_new_tokens: {limit} is too few for a complete answer (at least {needed})"
            )
        return constraint

    def _result(
        self,
        request: _Request,
        tokens: list[int],
        result: GenerationResult,
        preprocess_s: float,
        total: float,
        constraint: RequestConstraint | None,
    ) -> Extraction:
        eos = set(self.bundle.manifest.tokens.eos_ids)
        text_ids = [t for t in tokens if t not in eos]
        raw = self.tokenizer.decode(text_ids, skip_special_tokens=True)
        parsed = parse_output(raw)
        tags = (self.tags.think_open, self.tags.think_close)
        tags += (self.tags.answer_open, self.tags.answer_close)
        records = tuple(
            Entity(r.mention, r.type, r.boxes, find_spans(request.text, r.mention, tags))
            for r in records_to_original(parsed.records, request.geometry)
        )
        timings = {
            "preprocess": preprocess_s,
            **result.timings,
            "total": total,
            "tokens": len(tokens),
            "steps": result.steps,
            "forced_tokens": constraint.forced_tokens if constraint else 0,
            # 1 when the token budget narrowed a choice to close the answer in time
            "budget_limited": int(constraint.budget_limited) if constraint else 0,
            "drafted_tokens": result.drafted,
            "accepted_tokens": result.accepted,
        }
        return Extraction(
            records,
            parsed.think,
            raw,
            parsed.malformed,
            tuple(tokens),
            request.geometry.original_size,
            timings,
            request.geometry.model_size,
        )


def load(
    bundle_dir: str | Path | None = None,
    *,
    provider: str | None = None,
    provider_options: Mapping[str, Any] | None = None,
    device_id: int = 0,
    limits: EngineLimits | None = None,
    threads: int | None = None,
    verify_hashes: bool | str = True,
    max_text_tokens: int = MAX_TEXT_TOKENS,
    providers: Sequence[str] | None = None,
) -> Extractor:
    """An :class:`Extractor` for ``bundle_dir`` (default: the embedded default bundle).

    Args:
        provider: "auto" (CUDA when this onnxruntime has it, else the CPU; TensorRT when the
            bundle carries engines built for this GPU), "cpu", "cuda" or "tensorrt". None:
            the ``GMNER_PROVIDER`` environment variable, else "auto". A provider this
            onnxruntime lacks is a :class:`~gmner_rt.errors.BackendError` naming what is
            installed.
        provider_options: onnxruntime options of that provider (``{"gpu_mem_limit": ...}``
            for CUDA, ``trt_*`` names for TensorRT), over the ones gmner derives.
        device_id: the CUDA device.
        limits: TensorRT profiles for the ONNX graphs (batch, context, image tokens; default
            :func:`gmner_rt.tensorrt.default_limits`); prebuilt engines bring their own.
            Requests are kept inside them (batches split, too long prompts refused).
        threads: intra-op threads (default: onnxruntime's choice, or ``GMNER_THREADS``).
        verify_hashes: check every file's sha256 (sizes are always checked): True, once per
            change of the files (:mod:`gmner_rt.integrity`); "full", at every load; False,
            never.
        max_text_tokens: the longest text accepted.
        providers: deprecated: onnxruntime provider names; the first one is used as
            ``provider``.

    The providers each graph really runs on are logged, and exposed by
    ``extractor.provider`` and ``extractor.placement()``.
    """
    from .backends.onnxruntime import OrtGraphs, plan
    from .providers import choose, onnxruntime, requested

    path = Path(bundle_dir) if bundle_dir is not None else DEFAULT_BUNDLE
    if bundle_dir is None and not (path / "manifest.json").is_file():
        raise BundleError(f"no default bundle at {path}; pass a bundle directory")
    if providers is None and (name := requested(provider)) != "auto":
        choose(name, onnxruntime().get_available_providers())  # before hashing the bundle
    bundle = load_bundle(path, verify_hashes=verify_hashes)
    chosen = plan(
        bundle,
        provider,
        provider_options=provider_options,
        device_id=device_id,
        limits=limits,
        legacy_providers=providers,
        verify_hashes=verify_hashes,
    )
    for note in chosen.notes:
        log.info("%s", note)
    backend = OrtGraphs.from_bundle(bundle, chosen, threads=threads)
    _log_placement(path, bundle, backend, chosen.provider)
    return Extractor(bundle, backend, max_text_tokens=max_text_tokens)


#: Operators whose placement on the CPU in a GPU run costs real time (shape arithmetic and
#: index work on the CPU is onnxruntime's normal choice and costs little).
COMPUTE_OPS = frozenset(
    {"MatMul", "Gemm", "Conv", "MatMulNBits", "Attention", "MultiHeadAttention"}
    | {"GroupQueryAttention", "Softmax", "LayerNormalization", "SimplifiedLayerNormalization"}
    | {"SkipSimplifiedLayerNormalization", "Einsum", "RotaryEmbedding"}
)


def _log_placement(path: Path, bundle: Bundle, backend, provider: str) -> None:
    """Logs where each graph runs; warns when a GPU run left compute nodes on the CPU."""
    log.info("loaded %s (%s) on %s", path, bundle.manifest.model.name, provider)
    on_cpu = backend.cpu_ops() if provider != "cpu" else {}
    for graph, counts in backend.placement().items():
        if counts is None:
            log.debug("%s: providers %s", graph, backend.sessions()[graph].get_providers())
            continue
        shown = ", ".join(f"{ep} {n}" for ep, n in sorted(counts.items()))
        log.debug("%s nodes: %s", graph, shown)
        ops = on_cpu.get(graph) or {}
        heavy = {op: n for op, n in ops.items() if op in COMPUTE_OPS}
        if heavy:
            listed = ", ".join(f"{op} x{n}" for op, n in sorted(heavy.items()))
            log.warning("%s: compute nodes run on the CPU, not on %s: %s", graph, provider, listed)
        elif ops:
            log.info(
                "%s: %d shape/index nodes on the CPU (as onnxruntime places them)",
                graph,
                sum(ops.values()),
            )


def _limit_pixels(settings: ImageProcessorSettings, tokens: int) -> ImageProcessorSettings:
    """``settings`` whose max_pixels gives at most ``tokens`` merged image tokens."""
    cap = tokens * settings.factor**2
    if settings.max_pixels <= cap:
        return settings
    log.info(
        "images limited to %d image tokens (max_pixels %d) by TensorRT's profiles", tokens, cap
    )
    return dataclasses.replace(settings, max_pixels=cap, min_pixels=min(settings.min_pixels, cap))
