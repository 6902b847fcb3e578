"""Text to text (summarization, translation): generate a ``target`` text from a ``source`` text.

* seq2seq family: the encoder reads ``source``, the decoder learns ``target`` with teacher forcing.
* decoder family: one sequence ``prompt + target + <eos>``, where the prompt is
  ``prompt_template`` filled with the source (e.g. ``"{source}\\nSummary:"``); the loss counts only
  the target tokens (the prompt's labels are ignored), so the model learns to continue a prompt, not
  to write prompts.

Validation and test generate text greedily from the source (batched, with the generation engine)
and score it against the target with ROUGE-1/2/L (F-measure; ``torchmetrics`` ROUGEScore, no
stemmer, so it needs no ``nltk`` data) and SacreBLEU (tokenizer ``13a``). Generating is far slower
than a loss, so ``max_new_tokens``, ``max_generate_examples`` and ``generate_every`` bound its cost
during validation (``val/loss`` is computed on every validation run regardless); ``lmforge test``
always generates for every example. ``lmforge predict`` writes the generated text.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.text import SacreBLEUScore
from torchmetrics.text.rouge import ROUGEScore

from lmforge import LmforgeError, Task, hookimpl
from lmforge.plugin_api import IGNORE_INDEX, SpecialTokens

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


class TextMetrics(nn.Module):
    """ROUGE-1/2/L F-measure and SacreBLEU of generated texts against one reference each.

    SacreBLEU keeps n-gram count sums (constant memory, exact under DDP); torchmetrics' ROUGEScore
    keeps a few floats per example (its states are lists), which is why validation bounds the number
    of generated examples.
    """

    def __init__(self) -> None:
        super().__init__()
        self.rouge = ROUGEScore(rouge_keys=ROUGE_KEYS)
        self.bleu = SacreBLEUScore(tokenize="13a")

    def update(self, predictions: list[str], targets: list[str]) -> None:
        self.rouge.update(predictions, targets)
        self.bleu.update(predictions, [[t] for t in targets])

    def compute_and_reset(self) -> dict[str, torch.Tensor]:
        if not self.bleu.update_called:
            return {}
        rouge = self.rouge.compute()
        scores = {key: rouge[f"{key}_fmeasure"] for key in ROUGE_KEYS}
        scores["bleu"] = self.bleu.compute()
        self.rouge.reset()
        self.bleu.reset()
        return scores


class TextToText(Task):
    """Learn to write ``target`` for ``source`` (summaries, translations).

    Args:
        prompt_template: decoder family only: the prompt the target follows; ``{source}`` marks
            where the source text goes. A long source is cut so that prompt and target fit
            ``data.max_length``.
        max_target_length: Target tokens kept for training (the end-of-text token included); longer
            targets are cut.
        max_new_tokens: Most tokens generated per example in validation, test and predict.
        max_generate_examples: Per validation run and process, generate and score at most this many
            examples (the first batches); null: all. Test and predict always generate for all.
        generate_every: Generate (and log ROUGE/BLEU) on every ``generate_every``-th validation run
            only, counted from the first (the sanity check counts); 1: every run.
    """

    name: ClassVar[str] = "text_to_text"
    families: ClassVar[tuple[str, ...]] = ("seq2seq", "decoder")
    fields: ClassVar[tuple[str, ...]] = ("source", "target")
    label_fields: ClassVar[tuple[str, ...]] = ("target",)

    def __init__(
        self,
        prompt_template: str = "{source}\nOutput:",
        max_target_length: int = 128,
        max_new_tokens: int = 64,
        max_generate_examples: int | None = 256,
        generate_every: int = 1,
    ) -> None:
        if prompt_template.count("{source}") != 1:
            raise LmforgeError(
                f"text_to_text: prompt_template must contain '{{source}}' exactly once (where the source text "
                f"goes), got {prompt_template!r}. Example: '{{source}}\\nSummary:'."
            )
        if max_target_length < 2 or max_new_tokens < 1 or generate_every < 1:
            raise LmforgeError(
                f"text_to_text needs max_target_length >= 2, max_new_tokens >= 1 and generate_every >= 1 (got "
                f"{max_target_length}, {max_new_tokens}, {generate_every}); fix these task options."
            )
        if max_generate_examples is not None and max_generate_examples < 0:
            raise LmforgeError(f"text_to_text: max_generate_examples must be null or >= 0, not {max_generate_examples}.")
        self.prompt_template = prompt_template
        self.max_target_length = max_target_length
        self.max_new_tokens = max_new_tokens
        self.max_generate_examples = max_generate_examples
        self.generate_every = generate_every
        self.metrics = nn.ModuleDict({"val": TextMetrics(), "test": TextMetrics()})
        self._val_runs = 0  # validation runs finished (decides generate_every)
        self._val_generated = 0  # examples generated in the current validation run
        self._tokenizer_cache: tuple[str, Any] | None = None

    # -- data ------------------------------------------------------------------------------------
    @classmethod
    def example_records(cls) -> dict[str, list[Any]]:
        return {
            "source": ["Tom saw a red cat in the park.", "Anna liked the dog."],
            "target": ["Mia found a green dog in the garden.", "Leo loved the fox."],
        }

    def preprocess(
        self,
        records: dict[str, list[Any]],
        tokenizer: Any,
        special: SpecialTokens,
        max_length: int,
        family: str,
        stage: str,
    ) -> dict[str, list[Any]]:
        if special.eos_id is None:
            raise LmforgeError(
                "text_to_text needs a tokenizer with an end-of-text token (e.g. <|endoftext|> or </s>) to mark "
                "where a generated text ends; use such a tokenizer."
            )
        targets = records.get("target")
        rows: dict[str, list[Any]] = {"example_id": [], "input_ids": [], "prompt_ids": [], "source_text": []}
        if targets is not None:
            rows.update(labels=[], target_text=[])
        sources = records["source"]
        # one tokenizer call per column for the whole batch: the seq2seq source, or the decoder prompt
        encoded = tokenizer.encode_batch(
            sources if family == "seq2seq" else [self.prompt_template.format(source=s) for s in sources],
            add_special_tokens=False,
        )
        if targets is not None:
            encoded_targets = tokenizer.encode_batch(targets, add_special_tokens=False)
        for i, source in enumerate(sources):
            target_ids = []
            if targets is not None:
                target_ids = encoded_targets[i].ids[: self.max_target_length - 1] + [special.eos_id]
            if family == "seq2seq":
                prompt, _, _, _ = self.frame_input(encoded[i].ids, None, special, family, max_length)
                input_ids, labels = prompt, target_ids
            else:
                # without a target (predict), leave room for what will be generated (at most half)
                room = len(target_ids) if targets is not None else min(self.max_new_tokens, max_length // 2)
                prompt = self._prompt(source, encoded[i].ids, tokenizer, max_length - room, records["example_id"][i])
                input_ids = prompt + target_ids
                labels = [IGNORE_INDEX] * len(prompt) + target_ids
            rows["example_id"].append(records["example_id"][i])
            rows["input_ids"].append(input_ids)
            rows["prompt_ids"].append(prompt)
            rows["source_text"].append(source)
            if targets is not None:
                rows["labels"].append(labels)
                rows["target_text"].append(targets[i])
        return rows

    def _prompt(self, source: str, ids: list[int], tokenizer: Any, budget: int, example_id: Any) -> list[int]:
        """The decoder prompt's ids (``ids``: the filled template, encoded), at most ``budget`` long:
        the source is cut (at its end) to fit."""
        if len(ids) <= budget:
            return ids
        source_ids = tokenizer.encode(source, add_special_tokens=False).ids
        keep = budget - (len(ids) - len(source_ids)) - 2  # a margin: tokens may merge differently once cut
        if keep < 1:
            raise LmforgeError(
                f"text_to_text: record {example_id}: the prompt template and target leave no room for the source "
                f"within data.max_length. Raise data.max_length, or lower max_target_length, or shorten prompt_template."
            )
        cut = tokenizer.decode(source_ids[:keep])
        return tokenizer.encode(self.prompt_template.format(source=cut), add_special_tokens=False).ids[:budget]

    #: ``collate`` pads ``input_ids``/``labels`` and keeps the unpadded prompts (for generation) as lists
    list_columns: ClassVar[tuple[str, ...]] = ("prompt_ids", "example_id")

    # -- model -----------------------------------------------------------------------------------
    def step(self, module: Any, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        labels = batch["labels"]
        if module.family == "seq2seq":
            logits = module(batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        else:  # right padding never reaches earlier positions of a causal model: no mask needed
            architecture = module.architecture
            logits = architecture.logits(architecture(batch["input_ids"]))[:, :-1]
            labels = labels[:, 1:]
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        if stage in self.metrics and self._generates(stage, len(labels)):
            self.metrics[stage].update(self._generate(module, batch["prompt_ids"]), batch["target_text"])
        return {"loss": loss, "tokens": (labels != IGNORE_INDEX).sum()}

    def _generates(self, stage: str, batch_size: int) -> bool:
        """Whether this validation/test batch is generated (the validation cost bounds)."""
        if stage != "val":
            return True
        if self._val_runs % self.generate_every != 0:
            return False
        if self.max_generate_examples is not None and self._val_generated >= self.max_generate_examples:
            return False
        self._val_generated += batch_size
        return True

    def compute_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        if stage == "val":
            self._val_runs += 1
            self._val_generated = 0
        return self.metrics[stage].compute_and_reset()

    def predict_step(self, module: Any, batch: dict[str, Any]) -> list[dict[str, Any]]:
        texts = self._generate(module, batch["prompt_ids"])
        return [
            {"id": int(i), "source": source, "prediction": text}
            for i, source, text in zip(batch["example_id"], batch["source_text"], texts)
        ]

    def _generate(self, module: Any, prompts: list[list[int]]) -> list[str]:
        """Greedy continuations of ``prompts`` (decoder) or outputs for them (seq2seq), as text."""
        from lmforge.generation import GenerationConfig, generate_batch

        max_new_tokens = self.max_new_tokens
        block_size = getattr(module.architecture, "block_size", None)
        if module.family == "decoder" and block_size is not None:
            max_new_tokens = max(1, min(max_new_tokens, block_size - max(len(p) for p in prompts)))
        special = module.special
        outputs = generate_batch(
            module.architecture, module.family, prompts,
            GenerationConfig(max_new_tokens=max_new_tokens, greedy=True),
            pad_id=special.pad_id, eos_id=special.eos_id,
        )
        tokenizer = self._tokenizer(module)
        return [tokenizer.decode(sequences[0]).strip() for sequences in outputs]

    def _tokenizer(self, module: Any) -> Any:
        """The model's tokenizer (kept with its checkpoints), built once per tokenizer."""
        if self._tokenizer_cache is None or self._tokenizer_cache[0] != module.tokenizer_json:
            self._tokenizer_cache = (module.tokenizer_json, module.tokenizer())
        return self._tokenizer_cache[1]


@hookimpl
def lmforge_tasks():
    return [TextToText]
