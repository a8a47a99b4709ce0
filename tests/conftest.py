"""Shared fixtures: tiny models built from configs, and the real models in ../shared when present."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MINILM = SHARED / "models" / "all-MiniLM-L6-v2"
STORIES = SHARED / "models" / "stories260K"
GLUE = SHARED / "data" / "glue"


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: the real models/data live in ../shared beside the repo (CI has it)")
    return path


# tiny BERT's [CLS] and [SEP] (pad is 0): named in its config, and framing its ``model_inputs``.
BERT_CLS, BERT_SEP = 1, 2


def tiny_bert(num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                     cls_token_id=BERT_CLS, sep_token_id=BERT_SEP)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


TINY_MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


def model_inputs(kind: str, batch: int = 2, length: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # some padding, so masks are exercised
    if kind == "bert":  # [CLS] text [SEP], as a BERT tokenizer frames it (methods may act on them)
        ids[:, 0] = BERT_CLS
        ids[torch.arange(batch), mask.sum(dim=1) - 1] = BERT_SEP
    return {"input_ids": ids, "attention_mask": mask}


def apply_method(spec, model, adapter: str = "default"):
    """``get_peft_model`` with the method's default config, as (peft model, config). A method that
    builds on other adapters (``spec.example``) gets them first, perturbed so they are not the
    identity, and is then the only active adapter."""
    from peftlab import get_peft_model

    if spec.example is None:
        config = spec.config_cls()
        return get_peft_model(model, config, adapter), config
    prerequisites, config = spec.example()
    pm = None
    for i, (name, part) in enumerate(prerequisites.items()):
        pm = get_peft_model(model, part, name) if pm is None else (pm.add_adapter(name, part) or pm)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in pm.adapter_parameters(name):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    pm.add_adapter(adapter, config)
    pm.set_adapter(adapter)
    return pm, config


def load_method(spec, model, path, adapter: str = "default"):
    """Load what ``save_method`` wrote: the prerequisite adapters first, then the method's adapter."""
    from peftlab import PeftModel

    if spec.example is None:
        return PeftModel.from_pretrained(model, path, adapter_name=adapter)
    names = list(spec.example()[0])
    pm = PeftModel.from_pretrained(model, path / "prerequisites" / names[0], adapter_name=names[0])
    for name in names[1:]:
        pm.load_adapter(path / "prerequisites" / name, name)
    pm.load_adapter(path, adapter)
    pm.set_adapter(adapter)
    return pm


def save_method(spec, pm, path, adapter: str = "default") -> None:
    """Save the method's adapter at ``path`` and any prerequisites under ``path/prerequisites``."""
    pm.save_pretrained(path, adapter_names=[adapter])
    if spec.example is not None:
        pm.save_pretrained(path / "prerequisites", adapter_names=list(spec.example()[0]))


def training_batch(kind: str) -> dict[str, torch.Tensor]:
    """``model_inputs`` with labels: class ids for BERT, the tokens themselves for language models."""
    batch = model_inputs(kind)
    batch["labels"] = torch.tensor([0, 1]) if kind == "bert" else batch["input_ids"].clone()
    return batch


def begin_training(peft_model, kind: str) -> None:
    """Start training the way a loop does (methods with data passes get one batch; one that trains
    in its data pass does so at 1e-3)."""
    peft_model.begin_training([training_batch(kind)], total_steps=1, learning_rate=1e-3)


def labelled_batches(n: int = 2, seed: int = 0, size: int = 4) -> list[dict[str, torch.Tensor]]:
    """``n`` BERT batches of ``size`` x 8 random tokens, labelled by a rule on the first token (so a
    model can learn them): data for methods with a data pass or a training loop."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 100, (size, 8), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": (ids[:, 0] > 50).long()})
    return out


def perturb(target, adapter: str = "default", seed: int = 0, scale: float = 0.3) -> None:
    """Move trained tensors off their initial values by seeded noise N(0, scale^2), in place, so that an
    adapter computes something (most start as the identity). ``target``: a PeftModel or delta module
    (its ``adapter``'s parameters) or an iterable of tensors."""
    params = target.adapter_parameters(adapter) if hasattr(target, "adapter_parameters") else target
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def no_dropout(model):
    """Keep every module in eval behaviour even where a data pass switches to train mode, so runs
    can be compared with a computation by hand; returns ``model``."""
    for module in model.modules():
        module.register_forward_pre_hook(lambda m, args: setattr(m, "training", False))
    return model


def main_output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


class OpShapes(TorchDispatchMode):
    """Within the block, records (op, shape) of every tensor an op returns, except those sharing the
    storage of ``weight`` (views of a frozen base weight): shows whether a method ever forms a tensor
    as large as the weight it adapts (a dense update) in its forward or backward."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight_storage = weight.untyped_storage().data_ptr()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() != self.weight_storage:
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def check_position_limit(pm, kind: str) -> None:
    """``pm`` puts 20 soft positions in front of the tiny models' 64: 45 tokens (65 positions) are
    refused before the base model runs, by forward, given positions and generate; 44 tokens run."""
    from peftlab import PeftlabError

    calls = []
    pm.base_model.register_forward_pre_hook(lambda module, args: calls.append(1))
    ids = torch.randint(3, 100, (1, 45))
    with pytest.raises(PeftlabError, match=r"65 positions.*has 64 \(max_position_embeddings\).*at most 44 tokens"):
        pm(input_ids=ids)
    with pytest.raises(PeftlabError, match="max_position_embeddings"):  # given positions count too
        pm(input_ids=ids[:, :10], position_ids=torch.arange(40, 50).unsqueeze(0))
    if kind != "bert":
        with pytest.raises(PeftlabError, match="max_position_embeddings"):
            pm.generate(input_ids=ids, max_new_tokens=1)
    assert not calls, "the model ran"
    with torch.no_grad():
        assert main_output(pm(input_ids=ids[:, :44])).shape[0] == 1  # 64 positions: allowed


def tiny_search_context(seed: int = 0, batches: int = 4):
    """A search context over :func:`tiny_bert` and :func:`labelled_batches` (held-out batches scored by
    accuracy): what the search methods' tests train their candidates in."""
    from peftlab.train.loop import TrainArgs
    from peftlab.train.search import LoopSearchContext

    train_batches = labelled_batches(batches, seed=seed)
    held_out = labelled_batches(2, seed=seed + 1000)

    def accuracy(model) -> float:
        model.eval()
        with torch.no_grad():
            hits = [(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1)
                     == b["labels"]).float().mean() for b in held_out]
        return float(torch.stack(hits).mean())

    args = TrainArgs(lr=1e-2, max_steps=batches, warmup_ratio=0.0, seed=seed, progress=False)
    return LoopSearchContext(tiny_bert(), lambda: train_batches, accuracy, args, head=("classifier",))
