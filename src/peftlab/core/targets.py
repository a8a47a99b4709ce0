"""Which modules a method touches.

A target is one of:
- an exact module name or a name suffix (``"query"`` matches ``...attention.self.query``);
- ``"re:<regex>"`` (full match on the module name), or a whole-config regex string;
- ``"all-linear"``: every linear layer (``nn.Linear``, GPT-2 ``Conv1D``) except the output head;
- ``"@<site>"``: an architecture-level attach point, translated per model family in
  :data:`ARCHITECTURES` so methods never know BERT from Llama naming;
- ``"@<site>[<layers>]"``: the same in the listed layers only, e.g. ``"@ffn_out[0,3,6-11]"`` (indices in
  each layer stack; an encoder-decoder's index picks that layer in both stacks). Searches over placement
  (AutoPEFT, S3Delta-M, S4) write their choices this way, so a found config reads the same on any model
  of a family.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from torch import nn

from .errors import PeftlabError
from .layer import DeltaModule, base_of

try:  # GPT-2's transposed linear layer
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()  # type: ignore[assignment]

LINEAR_TYPES: tuple[type, ...] = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)  # type: ignore[assignment]
SITES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out", "ffn", "attention", "self_attention",
         "layernorm", "embeddings")


@dataclass(frozen=True)
class Architecture:
    """Module-name regexes (searched in the full name) for each attach point of one model family.

    ffn_input_arg: for post-LN blocks whose FFN output module also takes the residual (BERT's
        ``BertOutput(hidden, input_tensor)``), the positional index of the FFN input; ``None`` when
        the ``ffn`` module maps the FFN input (its first argument) to the FFN output.
    fused_qkv: query/key/value share one projection (GPT-2 ``c_attn``).
    """

    sites: dict[str, str]
    ffn_input_arg: int | None = None
    fused_qkv: bool = False
    aliases: tuple[str, ...] = field(default=())


_BERT = Architecture(
    sites={
        "query": r"\.attention\.self\.query$",
        "key": r"\.attention\.self\.key$",
        "value": r"\.attention\.self\.value$",
        "attn_out": r"\.attention\.output\.dense$",
        "ffn_in": r"\.intermediate\.dense$",
        "ffn_out": r"\.layer\.\d+\.output\.dense$",
        "ffn": r"\.layer\.\d+\.output$",
        "attention": r"\.attention\.self$",
        "self_attention": r"\.attention\.self$",
        "layernorm": r"LayerNorm$",
        "embeddings": r"embeddings\.word_embeddings$",
    },
    ffn_input_arg=1,
    aliases=("bert", "roberta", "xlm-roberta", "electra", "camembert", "mpnet"),
)
_GPT2 = Architecture(
    sites={
        "query": r"\.attn\.c_attn$",
        "key": r"\.attn\.c_attn$",
        "value": r"\.attn\.c_attn$",
        "attn_out": r"\.attn\.c_proj$",
        "ffn_in": r"\.mlp\.c_fc$",
        "ffn_out": r"\.mlp\.c_proj$",
        "ffn": r"\.h\.\d+\.mlp$",
        "attention": r"\.h\.\d+\.attn$",
        "self_attention": r"\.h\.\d+\.attn$",
        "layernorm": r"ln_(1|2|f)$",
        "embeddings": r"(^|\.)wte$",
    },
    fused_qkv=True,
    aliases=("gpt2",),
)
_LLAMA = Architecture(
    sites={
        "query": r"self_attn\.q_proj$",
        "key": r"self_attn\.k_proj$",
        "value": r"self_attn\.v_proj$",
        "attn_out": r"self_attn\.o_proj$",
        "ffn_in": r"mlp\.(gate_proj|up_proj)$",
        "ffn_out": r"mlp\.down_proj$",
        "ffn": r"layers\.\d+\.mlp$",
        "attention": r"layers\.\d+\.self_attn$",
        "self_attention": r"layers\.\d+\.self_attn$",
        "layernorm": r"norm$",
        "embeddings": r"embed_tokens$",
    },
    aliases=("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"),
)
_T5 = Architecture(
    sites={
        "query": r"(SelfAttention|EncDecAttention)\.q$",
        "key": r"(SelfAttention|EncDecAttention)\.k$",
        "value": r"(SelfAttention|EncDecAttention)\.v$",
        "attn_out": r"(SelfAttention|EncDecAttention)\.o$",
        "ffn_in": r"DenseReluDense\.(wi|wi_0|wi_1)$",
        "ffn_out": r"DenseReluDense\.wo$",
        "ffn": r"DenseReluDense$",
        "attention": r"(SelfAttention|EncDecAttention)$",
        "self_attention": r"SelfAttention$",
        "layernorm": r"layer_norm$",
        # The modules the stacks call; ``shared`` only ties their weight and is never called.
        "embeddings": r"(^|\.)(encoder|decoder)\.embed_tokens$",
    },
    aliases=("t5", "mt5", "umt5"),
)
ARCHITECTURES: dict[str, Architecture] = {a: arch for arch in (_BERT, _GPT2, _LLAMA, _T5) for a in arch.aliases}


def architecture_of(model: nn.Module) -> Architecture:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    raise PeftlabError(
        f"no attach-point map for model_type {model_type!r}; known: {sorted(ARCHITECTURES)}. "
        "Pass explicit module names as targets (e.g. targets=['q_proj', 'v_proj']) instead of '@' sites.")


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Module paths a target can name. A wrapper stands for the module it wraps (its
    ``base_layer`` is not listed separately); modules inside a wrapped module stay targetable
    (so a method can go inside a block another method wraps); adapter weights are never targets."""
    out: dict[str, nn.Module] = {}
    hidden: list[str] = []
    for name, module in model.named_modules():
        if not name or name.endswith(".base_layer") or any(name.startswith(p) for p in hidden):
            continue
        out[name] = module
        if isinstance(module, DeltaModule):
            hidden += [f"{name}.{attr}." for attr in module.adapter_attrs] + [f"{name}.{attr}" for attr in module.adapter_attrs]
    return {n: m for n, m in out.items() if n not in hidden}


def layer_of(model: nn.Module, path: str) -> tuple[str, int, int] | None:
    """(stack path, index, depth) of the transformer layer holding module ``path``: the first
    ``nn.ModuleList`` element on the path (``bert.encoder.layer.3``, ``encoder.block.3``); ``None``
    for modules outside the layer stacks (embeddings, final norm, head)."""
    parts = path.split(".")
    for i, part in enumerate(parts[1:], start=1):
        if part.isdigit():
            parent = model.get_submodule(".".join(parts[:i]))
            if isinstance(parent, nn.ModuleList):
                return logical_name(".".join(parts[:i])), int(part), len(parent)
    return None


def layer_block(model: nn.Module, path: str) -> str | None:
    """The path of the layer block (``bert.encoder.layer.3``) holding module ``path``, or ``None``."""
    where = layer_of(model, path)
    return None if where is None else f"{where[0]}.{where[1]}"


_LAYERED_SITE = re.compile(r"@(\w+)\[([\d,\s-]+)\]")


def parse_layers(spec: str, entry: str) -> set[int]:
    """``"0,3,6-11"`` -> {0, 3, 6, ..., 11}; ``entry`` names the target in the error."""
    chosen: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()) or (high and int(high) < int(low)):
            raise PeftlabError(f"target {entry!r}: layer list {spec!r} has {part!r}; expected indices and "
                               "ranges such as '0,3,6-11'")
        chosen |= set(range(int(low), int(high or low) + 1))
    if not chosen:
        raise PeftlabError(f"target {entry!r}: the layer list is empty; name at least one layer, e.g. '@ffn_out[0]'")
    return chosen


def site_in_layers(site: str, layers: list[int] | set[int]) -> str:
    """The target ``"@site[0-3,6]"`` for ``layers`` (sorted; runs written as ranges): what a search writes."""
    runs: list[list[int]] = []
    for i in sorted(layers):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return f"@{site}[{','.join(str(a) if a == b else f'{a}-{b}' for a, b in runs)}]"


def logical_name(path: str) -> str:
    """The module's name in the unwrapped model: what users and site patterns refer to."""
    return path.replace(".base_layer", "")


def _output_head_names(model: nn.Module, candidates: dict[str, nn.Module]) -> set[str]:
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    for name, module in candidates.items():
        leaf = name.rsplit(".", 1)[-1]
        if (out_emb is not None and base_of(module) is base_of(out_emb)) or leaf in {"classifier", "score", "lm_head", "qa_outputs"}:
            heads.add(name)
        if name.startswith(("classifier.", "score.")):
            heads.add(name)
    return heads


def resolve_targets(model: nn.Module, targets: str | tuple[str, ...] | list[str],
                    allowed_types: tuple[type, ...] | None = None) -> list[str]:
    """Module names selected by ``targets``, in model order. Every entry must match something."""
    candidates = _candidates(model)
    if isinstance(targets, str) and targets != "all-linear":
        pattern = _compile(targets.removeprefix("re:"))  # one regex for the whole config, "re:" optional
        chosen = {n for n in candidates if pattern.fullmatch(logical_name(n))}
        if not chosen:
            raise PeftlabError(f"target regex {targets!r} matches no module. {_similar(targets, candidates)}")
    else:
        entries = ("all-linear",) if targets == "all-linear" else tuple(targets)
        chosen = set()
        for entry in entries:
            found = _match(model, entry, candidates)
            if not found:
                raise PeftlabError(f"target {entry!r} matches no module of {type(model).__name__}. "
                                   f"{_similar(entry, candidates)}")
            chosen |= found
    names = [n for n in candidates if n in chosen]
    if allowed_types is not None:
        wrong = [n for n in names if not isinstance(base_of(candidates[n]), allowed_types)]
        if wrong:
            kinds = ", ".join(sorted({type(base_of(candidates[n])).__name__ for n in wrong}))
            allowed = ", ".join(t.__name__ for t in allowed_types)
            raise PeftlabError(f"targets select {wrong[:3]}{'...' if len(wrong) > 3 else ''} of type {kinds}; "
                               f"this method supports {allowed}. Narrow the targets.")
    return names


def _match(model: nn.Module, entry: str, candidates: dict[str, nn.Module]) -> set[str]:
    if entry == "all-linear":
        heads = _output_head_names(model, candidates)
        return {n for n, m in candidates.items() if isinstance(base_of(m), LINEAR_TYPES) and n not in heads}
    if entry.startswith("@"):
        layered = _LAYERED_SITE.fullmatch(entry)
        site = layered.group(1) if layered else entry[1:]
        arch = architecture_of(model)
        if site not in arch.sites:
            raise PeftlabError(f"unknown attach point {entry!r}; known: {', '.join('@' + s for s in SITES)}, "
                               "each optionally with a layer list such as '@ffn_out[0,3,6-11]'")
        pattern = re.compile(arch.sites[site])
        found = {n for n in candidates if pattern.search(logical_name(n))}
        if layered:
            layers = parse_layers(layered.group(2), entry)
            where = {n: layer_of(model, n) for n in found}
            depth = max((w[2] for w in where.values() if w), default=0)
            if max(layers) >= depth:
                raise PeftlabError(f"target {entry!r}: layer {max(layers)} does not exist; {type(model).__name__}'s "
                                   f"{site} layer stacks have {depth} layers (0-{depth - 1})")
            found = {n for n, w in where.items() if w is not None and w[1] in layers}
        return found
    if entry.startswith("re:"):
        pattern = _compile(entry[3:])
        return {n for n in candidates if pattern.fullmatch(logical_name(n))}
    return {n for n in candidates if logical_name(n) == entry or logical_name(n).endswith("." + entry)}


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise PeftlabError(f"target regex {pattern!r} is not a valid regular expression ({err}); "
                           "fix it, or name modules without 're:'") from None


def _similar(entry: str, candidates: dict[str, nn.Module]) -> str:
    leaves = sorted({logical_name(n).rsplit(".", 1)[-1] for n in candidates})
    close = difflib.get_close_matches(entry.lstrip("@").removeprefix("re:"), leaves, n=5, cutoff=0.4)
    if not close:
        close = leaves[:12]
    return f"Similar module names: {', '.join(close)}."


# peft adds both for sequence classification; a model has one or the other.
_OPTIONAL_HEADS = ("classifier", "score")


def resolve_modules_to_save(model: nn.Module, names: tuple[str, ...] | str) -> list[str]:
    """Modules trained in full beside the adapter; peft's two default head names may be absent."""
    entries = (names,) if isinstance(names, str) else tuple(names)
    candidates = _candidates(model)
    chosen: list[str] = []
    for entry in entries:
        found = _match(model, entry, candidates)
        if not found and entry not in _OPTIONAL_HEADS:
            raise PeftlabError(f"modules_to_save entry {entry!r} matches no module. {_similar(entry, candidates)}")
        chosen += [n for n in candidates if n in found and n not in chosen]
    # A module inside another chosen one is saved with it.
    return [n for n in chosen if not any(n.startswith(o + ".") for o in chosen)]
