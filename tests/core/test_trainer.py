"""A PeftModel drops into the HF Trainer unchanged."""
import torch

from peftlab import LoraConfig, get_peft_model

from ..conftest import tiny_bert


class Rows(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, 100, (32, 8), generator=g)
        self.labels = (self.ids[:, 0] > 50).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}


def test_trainer_trains_only_the_adapter(tmp_path):
    from transformers import Trainer, TrainingArguments

    pm = get_peft_model(tiny_bert(), LoraConfig(r=4, targets=("@query", "@value"), modules_to_save=("classifier",)))
    frozen = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=1,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    Trainer(model=pm, args=args, train_dataset=Rows()).train()
    assert all(torch.equal(p, frozen[n]) for n, p in pm.named_parameters() if n in frozen)
    assert any(not torch.equal(p, before[n]) for n, p in pm.named_parameters() if n in before)


def test_trainer_evaluates_with_labels_and_compute_metrics(tmp_path):
    from transformers import Trainer, TrainingArguments

    from peftlab.core.model import PeftModelForSequenceClassification

    pm = get_peft_model(tiny_bert(), LoraConfig(r=4, modules_to_save=("classifier",)))
    assert isinstance(pm, PeftModelForSequenceClassification)
    seen = []

    def accuracy(prediction):
        seen.append(prediction.label_ids.shape)
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=8, report_to=[],
                             use_cpu=True, disable_tqdm=True)
    metrics = Trainer(model=pm, args=args, eval_dataset=Rows(), compute_metrics=accuracy).evaluate()
    assert seen == [(32,)]
    assert metrics["eval_loss"] > 0 and 0 <= metrics["eval_accuracy"] <= 1
