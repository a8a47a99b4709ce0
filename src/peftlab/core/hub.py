"""Upload adapters to the Hugging Face Hub: the small folder ``save_pretrained`` writes, not the model.

Without this, ``peft_model.push_to_hub`` reaches the base model through ``PeftModel.__getattr__``
and uploads every weight of it. HF peft uploads the adapter folder; so does this, in peft's layout,
so ``PeftModel.from_pretrained(base, repo_id)`` in peft (or peftlab, after a download) reads it.
"""
from __future__ import annotations

import tempfile
from typing import TYPE_CHECKING, Any

from .errors import PeftlabError

if TYPE_CHECKING:
    from .model import PeftModel


def push_to_hub(model: "PeftModel", repo_id: str, *, adapter_names: list[str] | None = None,
                commit_message: str = "Upload peftlab adapter", private: bool | None = None,
                token: str | bool | None = None, revision: str | None = None, create_pr: bool = False) -> Any:
    """Create the model repo ``repo_id`` if needed and upload ``model``'s adapters to it.

    The uploaded folder is what ``model.save_pretrained(folder, adapter_names)`` writes:
    ``adapter_config.json`` + ``adapter_model.safetensors`` for ``default``, the same in
    ``<name>/`` for any other adapter. Returns ``huggingface_hub``'s ``CommitInfo``.
    """
    from huggingface_hub import HfApi  # a transformers dependency; imported here to keep core light

    from .model import PeftModel

    if not isinstance(model, PeftModel):
        raise PeftlabError(f"push_to_hub(model, repo_id): model must be a peftlab PeftModel, got "
                           f"{type(model).__name__}; for a plain transformers model call its own push_to_hub")
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise PeftlabError(f"push_to_hub: repo_id must be a Hub repo name such as 'user/my-adapter', got {repo_id!r}")
    if not model.peft_configs:
        raise PeftlabError("push_to_hub: the model has no adapters left (merged or unloaded?); "
                           "push the merged model with its own push_to_hub, or add an adapter first")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory(prefix="peftlab-push-") as folder:
        model.save_pretrained(folder, adapter_names=adapter_names)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                 revision=revision, create_pr=create_pr, repo_type="model")
