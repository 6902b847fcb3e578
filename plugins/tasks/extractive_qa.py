"""Extractive question answering (SQuAD 1.1 / 2.0): find the answer span in a context.

Records are SQuAD-style: ``question``, ``context`` and ``answers`` ``{"text": [...],
"answer_start": [...]}`` with character offsets into the context (an empty ``text`` list marks an
unanswerable question). ``data.columns`` maps differently named file columns to these fields.

How a record becomes model input: the question and the context are tokenized separately (with
character offsets); a context longer than fits beside the question is cut into overlapping windows
of context tokens, consecutive windows sharing ``stride`` tokens, and each window is framed with
the question by :meth:`~lmforge.Task.frame_input` (``[CLS] question [SEP] window [SEP]``).

The head scores every token as the start and as the end of the answer. A window's labels are the
answer's first and last tokens when the whole answer lies inside the window, else position 0 (the
``[CLS]`` token), as SQuAD 2.0 training does; its score ``start[0] + end[0]`` is the "no answer"
score.

Why one feature row per *record* (holding all its windows) rather than one per window: the best
answer of an example is chosen across all its windows, so they must be scored together. With one
row per record, a batch (and, under DDP, a rank) always holds every window of the examples it has,
so each step reduces its logits to one best span per example right away and only text reaches
:class:`~lmforge.metrics.SquadScores` (sum states): nothing the size of the logits is kept or
gathered, and ``lmforge predict`` writes one line per record without a merge. The cost: a batch of
``batch_size`` records holds between ``batch_size`` and (number of windows) x ``batch_size``
windows, so very long contexts make larger batches.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lmforge import LmforgeError, Task, hookimpl
from lmforge.metrics import SquadScores
from lmforge.plugin_api import SpecialTokens


def context_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int]]:
    """``(first, end)`` token ranges covering ``n_tokens`` context tokens, ``window`` tokens each,
    consecutive ones overlapping by ``stride`` tokens (one empty window for an empty context)."""
    ranges, first = [], 0
    while True:
        end = min(first + window, n_tokens)
        ranges.append((first, end))
        if end >= n_tokens:
            return ranges
        first += window - stride


def answer_token_span(offsets: list[tuple[int, int]], char_start: int, char_end: int) -> tuple[int, int] | None:
    """The first and last context tokens overlapping the characters ``[char_start, char_end)``."""
    covering = [i for i, (s, e) in enumerate(offsets) if s < char_end and e > char_start]
    return (covering[0], covering[-1]) if covering else None


def best_spans(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    context_mask: torch.Tensor,
    max_answer_length: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best answer span of each window: ``(score, start, end)``, each ``(N,)``.

    ``start_logits``/``end_logits`` are ``(N, T)``; ``context_mask`` ``(N, T)`` is True at context
    tokens. A valid span starts and ends on context tokens with ``start <= end < start +
    max_answer_length``; a window without one gets score ``-inf``. The scan runs over span lengths
    (``O(N * T * max_answer_length)``), never building the ``(N, T, T)`` table.
    """
    N, T = start_logits.shape
    best = torch.full((N,), float("-inf"), dtype=start_logits.dtype, device=start_logits.device)
    best_start = torch.zeros(N, dtype=torch.long, device=start_logits.device)
    best_length = torch.zeros(N, dtype=torch.long, device=start_logits.device)
    for length in range(min(max_answer_length, T)):  # end = start + length
        valid = context_mask[:, : T - length] & context_mask[:, length:]  # (N, T - length)
        scores = (start_logits[:, : T - length] + end_logits[:, length:]).masked_fill(~valid, float("-inf"))
        value, index = scores.max(dim=1)
        better = value > best
        best = torch.where(better, value, best)
        best_start = torch.where(better, index, best_start)
        best_length = torch.where(better, torch.full_like(best_length, length), best_length)
    return best, best_start, best_start + best_length


class ExtractiveQA(Task):
    """Extractive question answering: predict the answer's start and end tokens in the context.

    Args:
        stride: Context tokens shared by consecutive windows of a long context (so an answer cut by
            one window's edge lies whole inside the next). Must be smaller than the window.
        max_question_length: Questions longer than this many tokens are cut (from the end).
        max_answer_length: Longest answer, in tokens, considered at prediction.
        allow_unanswerable: SQuAD 2.0: a question may have no answer in its context (an empty
            ``answers.text``), and the model may answer "" (no answer). Off (SQuAD 1.1): every
            training record needs an answer and a non-empty span is always predicted.
        null_threshold: With ``allow_unanswerable``, answer "" when the no-answer score exceeds the
            best span's score by more than this (raise it to answer less often; tune on dev data).
    """

    name: ClassVar[str] = "extractive_qa"
    families: ClassVar[tuple[str, ...]] = ("encoder",)
    fields: ClassVar[tuple[str, ...]] = ("question", "context", "answers")
    label_fields: ClassVar[tuple[str, ...]] = ("answers",)

    def __init__(
        self,
        stride: int = 32,
        max_question_length: int = 64,
        max_answer_length: int = 30,
        allow_unanswerable: bool = False,
        null_threshold: float = 0.0,
    ) -> None:
        if stride < 0 or max_question_length < 1 or max_answer_length < 1:
            raise LmforgeError(
                f"extractive_qa needs stride >= 0, max_question_length >= 1 and max_answer_length >= 1 (got "
                f"{stride}, {max_question_length}, {max_answer_length}); fix these task options."
            )
        self.stride = stride
        self.max_question_length = max_question_length
        self.max_answer_length = max_answer_length
        self.allow_unanswerable = allow_unanswerable
        self.null_threshold = null_threshold
        self.metrics = nn.ModuleDict({"val": SquadScores(), "test": SquadScores()})

    def build(self, module: Any) -> None:
        self.qa_head = nn.Linear(module.architecture.d_model, 2)  # start and end score of each token

    # -- data ------------------------------------------------------------------------------------
    @classmethod
    def example_records(cls) -> dict[str, list[Any]]:
        contexts = ["Tom is at the park. Anna has a red kite.", "The dog sat under the big tree."]
        return {
            "question": ["What does Anna have?", "Where did the dog sit?"],
            "context": contexts,
            "answers": [
                {"text": ["red kite"], "answer_start": [contexts[0].index("red kite")]},
                {"text": ["under the big tree"], "answer_start": [contexts[1].index("under the big tree")]},
            ],
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
        rows: dict[str, list[Any]] = {
            k: []
            for k in ("example_id", "input_ids", "token_type_ids", "windows", "context_offsets", "qa_context", "qa_question")
        }
        has_answers = "answers" in records and records["answers"] is not None
        if has_answers:
            rows.update(start_positions=[], end_positions=[], gold_answers=[])
        questions = tokenizer.encode_batch(records["question"], add_special_tokens=False)
        contexts = tokenizer.encode_batch(records["context"], add_special_tokens=False)
        for i, (question, context) in enumerate(zip(questions, contexts)):
            example_id = records["example_id"][i]
            question_ids = question.ids[: self.max_question_length]
            # framing overhead ([CLS], [SEP]s): frame an empty context with ample room
            framed, _, _, _ = self.frame_input(question_ids, [], special, family, max_length + 10**6)
            window = max_length - len(framed)
            if window < 1 or (len(context.ids) > window and window <= self.stride):  # windows could not advance
                raise LmforgeError(
                    f"extractive_qa: with max_length={max_length}, record {example_id}'s question "
                    f"({len(question_ids)} tokens) leaves {max(window, 0)} context tokens per window, not more than "
                    f"stride={self.stride}. Raise data.max_length, or lower the task's stride or max_question_length."
                )
            offsets = [tuple(o) for o in context.offsets]
            span = None
            if has_answers:
                span, golds = self._answer(records, i, example_id, offsets)
                rows["gold_answers"].append(golds)
            input_ids, type_ids, windows, starts, ends = [], [], [], [], []
            for first, end in context_windows(len(context.ids), window, self.stride):
                ids, types, _, b_start = self.frame_input(question_ids, context.ids[first:end], special, family, max_length)
                input_ids.append(ids)
                type_ids.append(types)
                windows.append([b_start, first, end - first])  # where the context sits, which tokens
                inside = span is not None and first <= span[0] and span[1] < end
                starts.append(b_start + span[0] - first if inside else 0)
                ends.append(b_start + span[1] - first if inside else 0)
            rows["example_id"].append(example_id)
            rows["input_ids"].append(input_ids)
            rows["token_type_ids"].append(type_ids)
            rows["windows"].append(windows)
            rows["context_offsets"].append([list(o) for o in offsets])
            rows["qa_context"].append(records["context"][i])
            rows["qa_question"].append(records["question"][i])
            if has_answers:
                rows["start_positions"].append(starts)
                rows["end_positions"].append(ends)
        return rows

    def _answer(
        self, records: dict[str, list[Any]], i: int, example_id: Any, offsets: list[tuple[int, int]]
    ) -> tuple[tuple[int, int] | None, list[str]]:
        """The first answer's token span (``None``: unanswerable) and every gold answer text."""
        answers = records["answers"][i] or {}
        if not isinstance(answers, dict):
            raise LmforgeError(
                f"extractive_qa: record {example_id}'s answers is {answers!r}, not a SQuAD answers object "
                '{"text": [...], "answer_start": [...]}. Convert the data to that shape, or map the right '
                "column to the field answers (data.columns)."
            )
        texts, starts = list(answers.get("text") or []), list(answers.get("answer_start") or [])
        if not texts:
            if not self.allow_unanswerable:
                raise LmforgeError(
                    f"extractive_qa: record {example_id} has no answer (answers.text is empty). Set the task "
                    "option allow_unanswerable: true for SQuAD 2.0-style data, or remove the record."
                )
            return None, []
        context = records["context"][i]
        text, start = texts[0], int(starts[0]) if starts else -1
        if context[start : start + len(text)] != text:
            raise LmforgeError(
                f"extractive_qa: record {example_id}'s answer {text!r} is not at character {start} of its context "
                f"(found {context[start:start + len(text)]!r}). answers.answer_start must be the character offset "
                "of answers.text in the context; fix the data or its column mapping (data.columns)."
            )
        span = answer_token_span(offsets, start, start + len(text))
        if span is None:
            raise LmforgeError(f"extractive_qa: record {example_id}'s answer {text!r} covers no token of the context.")
        return span, texts

    pad_values: ClassVar[dict[str, Any]] = {"input_ids": "pad"}

    def collate(self, features: list[dict[str, Any]], special: SpecialTokens) -> dict[str, Any]:
        """Flatten the windows of every record into one batch of windows; ``window_example`` maps each
        window to its record's index in the batch."""
        windows = [
            {"input_ids": ids, "token_type_ids": types}
            for f in features
            for ids, types in zip(f["input_ids"], f["token_type_ids"])
        ]
        batch = super().collate(windows, special)
        batch["window_example"] = torch.tensor([j for j, f in enumerate(features) for _ in f["windows"]])
        batch["windows"] = torch.tensor([w for f in features for w in f["windows"]], dtype=torch.long)
        for key in ("start_positions", "end_positions"):
            if key in features[0]:
                batch[key] = torch.tensor([p for f in features for p in f[key]], dtype=torch.long)
        for key in ("example_id", "context_offsets", "qa_context", "qa_question", "gold_answers"):
            if key in features[0]:
                batch[key] = [f[key] for f in features]
        return batch

    # -- model -----------------------------------------------------------------------------------
    def _logits(self, module: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        logits = self.qa_head(module.token_features(inputs)).float()  # (N, T, 2)
        padding = batch["attention_mask"] == 0
        start, end = logits.unbind(-1)
        return start.masked_fill(padding, float("-inf")), end.masked_fill(padding, float("-inf"))

    def step(self, module: Any, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        start, end = self._logits(module, batch)
        loss = 0.5 * (F.cross_entropy(start, batch["start_positions"]) + F.cross_entropy(end, batch["end_positions"]))
        if stage in self.metrics:
            answers = [a["answer"] for a in self._answers(batch, start.detach(), end.detach())]
            self.metrics[stage].update(answers, batch["gold_answers"])
        return {"loss": loss, "tokens": torch.tensor(start.size(0), device=loss.device)}

    def compute_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        metric = self.metrics[stage]
        if not metric.update_called:
            return {}
        scores = metric.compute()
        metric.reset()
        return scores

    def predict_step(self, module: Any, batch: dict[str, Any]) -> list[dict[str, Any]]:
        start, end = self._logits(module, batch)
        answers = self._answers(batch, start, end)
        return [
            {"id": int(example_id), "question": question, **answer}
            for example_id, question, answer in zip(batch["example_id"], batch["qa_question"], answers)
        ]

    def _answers(self, batch: dict[str, Any], start: torch.Tensor, end: torch.Tensor) -> list[dict[str, Any]]:
        """Per record: the best valid span over all its windows (or "" when no answer wins)."""
        windows = batch["windows"]  # (N, 3): context position in the window, first token, count
        positions = torch.arange(start.size(1), device=start.device)[None, :]
        context_mask = (positions >= windows[:, :1]) & (positions < windows[:, :1] + windows[:, 2:])
        score, span_start, span_end = best_spans(start, end, context_mask, self.max_answer_length)
        null = start[:, 0] + end[:, 0]
        score, span_start, span_end, null = (t.tolist() for t in (score, span_start, span_end, null))
        window_rows = windows.tolist()
        by_example: list[list[int]] = [[] for _ in batch["qa_context"]]
        for w, j in enumerate(batch["window_example"].tolist()):
            by_example[j].append(w)
        results: list[dict[str, Any]] = []
        for j, example_windows in enumerate(by_example):
            best, null_score = None, float("inf")
            for w in example_windows:
                null_score = min(null_score, null[w])
                if best is None or score[w] > score[best]:
                    best = w
            if best is None or score[best] == float("-inf") or (
                self.allow_unanswerable and null_score - score[best] > self.null_threshold
            ):
                results.append({"answer": "", "score": null_score if null_score != float("inf") else 0.0})
                continue
            b_start, first, _ = window_rows[best]
            offsets = batch["context_offsets"][j]
            char_start = offsets[first + span_start[best] - b_start][0]
            char_end = offsets[first + span_end[best] - b_start][1]
            text = batch["qa_context"][j][char_start:char_end].strip()
            results.append({"answer": text, "score": score[best]})
        return results


@hookimpl
def lmforge_tasks():
    return [ExtractiveQA]
