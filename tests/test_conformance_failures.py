"""The conformance check catches each way a plugin can break the contract, and says which and why.

Each plugin below is a small working decoder (or objective) with one deliberate defect; the check
for that defect must fail with a reason naming it, and the other checks must still run.
"""

from __future__ import annotations

import json
import types
from fractions import Fraction

import pytest
import torch
from torch import nn

from lmforge import Architecture, LmforgeError
from lmforge.cli import main
from lmforge.families import FAMILY_MODULES
from lmforge.testing import assert_conforms, check_plugin
from lmforge_plugins.objectives.clm import CLM


class TinyDecoder(Architecture):
    """A correct bag-of-previous-tokens decoder with a cache: the base every defect starts from."""

    name = "tiny_decoder"
    families = ("decoder",)

    def __init__(self, vocab_size: int | None = None, d_model: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.mix = nn.Linear(d_model, d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, input_ids, attention_mask=None, position_ids=None, document_ids=None, cache=None):
        x = self.embed(input_ids)  # (B, T, C)
        past_sum = cache["sum"] if cache is not None else torch.zeros_like(x[:, :1])
        past_n = cache["n"] if cache is not None else 0
        sums = past_sum + x.cumsum(dim=1)  # (B, T, C): running sum over every token so far
        counts = past_n + torch.arange(1, x.size(1) + 1, dtype=x.dtype)[None, :, None]
        if cache is not None:
            cache["sum"], cache["n"] = sums[:, -1:], past_n + x.size(1)
        return torch.tanh(self.mix(sums / counts))

    def logits(self, hidden):
        return self.head(hidden)

    def new_cache(self, batch_size, max_length):
        return {"sum": torch.zeros(batch_size, 1, self.embed.embedding_dim), "n": 0}


def report_of(cls, **kwargs):
    report = check_plugin(cls, **kwargs)
    return (
        report,
        {r.check: r for r in report.results if not r.partner},
        {r.check: r for r in report.results if r.partner},
    )


def test_the_base_decoder_conforms():
    report = assert_conforms(TinyDecoder)
    assert report.count("fail") == 0 and report.count("pass") >= 10


def test_wrong_logits_shape():
    class WideLogits(TinyDecoder):
        def logits(self, hidden):
            return torch.cat([self.head(hidden), self.head(hidden)], dim=-1)

    report, checks, _ = report_of(WideLogits)
    assert not report.ok
    assert checks["forward shapes"].status == "fail"
    assert "logits(hidden) has shape (2, 12, 320), expected (2, 12, 160)" in checks["forward shapes"].detail


def test_nan_on_padded_rows():
    class NanOnPadding(TinyDecoder):
        def forward(self, input_ids, attention_mask=None, **kwargs):
            hidden = super().forward(input_ids, **kwargs)
            if attention_mask is not None:  # a classic: normalising by a count that is zero for padding
                hidden = hidden / attention_mask[..., None].float() * attention_mask[..., None]
            return hidden

    report, checks, trained = report_of(NanOnPadding)
    assert checks["forward shapes"].status == "pass"  # real positions are finite
    assert trained["finite loss"].status == "pass"  # padding is ignored by the loss...
    assert trained["backward"].status == "fail"  # ...but its NaN reaches every gradient
    assert "non-finite gradient in 5 parameter(s): ['architecture.embed.weight'" in trained["backward"].detail
    assert trained["optimizer step"].status == "skip" and "depends on failed" in trained["optimizer step"].detail


def test_nan_loss():
    class Exploding(TinyDecoder):
        def logits(self, hidden):
            return super().logits(hidden) * float("inf")

    report, checks, trained = report_of(Exploding)
    assert trained["finite loss"].status == "fail" and "packed batch's loss is nan" in trained["finite loss"].detail
    assert trained["backward"].status == "skip"


def test_cache_that_forgets_the_past():
    class Forgetful(TinyDecoder):
        def forward(self, input_ids, attention_mask=None, position_ids=None, document_ids=None, cache=None):
            if cache is not None:
                cache = self.new_cache(input_ids.size(0), 0)  # starts over at every step
            return super().forward(input_ids, cache=cache)

    report, checks, _ = report_of(Forgetful)
    assert checks["cached generation"].status == "fail"
    assert (
        "cached tokens" in checks["cached generation"].detail
        and "logits: max abs difference" in checks["cached generation"].detail
    )
    assert checks["save/load round trip"].status == "pass"


def test_unused_parameter():
    class Unused(TinyDecoder):
        def __init__(self, vocab_size: int | None = None, d_model: int = 8) -> None:
            super().__init__(vocab_size, d_model)
            self.spare = nn.Linear(d_model, d_model)

    report, checks, _ = report_of(Unused)
    assert checks["every parameter trained"].status == "fail"
    assert "['spare.weight', 'spare.bias']" in checks["every parameter trained"].detail


def test_state_outside_the_state_dict():
    class HiddenState(TinyDecoder):
        def __init__(self, vocab_size: int | None = None, d_model: int = 8) -> None:
            super().__init__(vocab_size, d_model)
            self.projection = torch.randn(d_model, d_model)  # a plain attribute: not saved

        def forward(self, input_ids, **kwargs):
            return super().forward(input_ids, **kwargs) @ self.projection

    report, checks, _ = report_of(HiddenState)
    assert checks["save/load round trip"].status == "fail"
    assert "outputs of the reloaded model: max abs difference" in checks["save/load round trip"].detail


class Gpt2Like(TinyDecoder):
    """Declares a Hugging Face name map; a subclass breaks it."""

    name = "gpt2_like"
    hf_model_type = "tiny-hf"

    @classmethod
    def options_from_hf_config(cls, hf_config):
        return {"vocab_size": hf_config["vocab"], "d_model": hf_config["width"]}

    def hf_config(self):
        return {"model_type": "tiny-hf", "vocab": self.head.out_features, "width": self.embed.embedding_dim}

    def lmforge_state_dict_to_hf(self, state=None):
        state = self.state_dict() if state is None else state
        return {"model." + k: v for k, v in state.items()}

    def hf_state_dict_to_lmforge(self, hf_state):
        return {k.removeprefix("model."): v for k, v in hf_state.items()}


def test_hugging_face_round_trips():
    report, checks, _ = report_of(Gpt2Like)
    assert checks["Hugging Face name map"].status == "pass" and checks["Hugging Face config"].status == "pass"

    class DropsBias(Gpt2Like):
        def hf_state_dict_to_lmforge(self, hf_state):
            return {k: v for k, v in super().hf_state_dict_to_lmforge(hf_state).items() if k != "head.bias"}

    class TransposesWrong(Gpt2Like):
        def hf_state_dict_to_lmforge(self, hf_state):
            out = super().hf_state_dict_to_lmforge(hf_state)
            out["mix.weight"] = out["mix.weight"].t()
            return out

    class ForgetsWidth(Gpt2Like):
        @classmethod
        def options_from_hf_config(cls, hf_config):
            return {"vocab_size": hf_config["vocab"], "d_model": 2 * hf_config["width"]}

    _, checks, _ = report_of(DropsBias, partners=[])
    assert (
        checks["Hugging Face name map"].status == "fail"
        and "loses ['head.bias']" in checks["Hugging Face name map"].detail
    )
    _, checks, _ = report_of(TransposesWrong, partners=[])
    assert "changes 1 tensor(s): ['mix.weight']" in checks["Hugging Face name map"].detail
    _, checks, _ = report_of(ForgetsWidth, partners=[])
    assert (
        checks["Hugging Face config"].status == "fail"
        and "differs in ['width']" in checks["Hugging Face config"].detail
    )


def test_options_that_checkpoints_cannot_store_and_options_without_defaults():
    class FractionOption(TinyDecoder):
        def __init__(self, vocab_size: int | None = None, d_model: int = 8, scale: object = Fraction(1, 2)) -> None:
            super().__init__(vocab_size, d_model)

    class NeedsAnOption(TinyDecoder):
        def __init__(self, vocab_size: int | None = None, d_model: int = 8, *, mode: str) -> None:
            super().__init__(vocab_size, d_model)

    _, checks, _ = report_of(FractionOption)
    assert checks["options rebuild the plugin"].status == "fail"
    assert "plugin_config() holds something other than plain data" in checks["options rebuild the plugin"].detail
    report, checks, _ = report_of(NeedsAnOption)
    assert (
        checks["build from defaults"].status == "fail"
        and "mode have no default" in checks["build from defaults"].detail
    )
    assert checks["options rebuild the plugin"].status == "skip"
    assert len(report.results) == 3  # nothing else can run without an instance


# Objectives are pickled for data-loader workers: these are module-level so that only their defect
# (not being local classes) decides whether they pickle.
class HoldsALambda(CLM):
    name = "holds_a_lambda"

    def __init__(self) -> None:
        super().__init__()
        self.transform = lambda ids: ids


class DetachedLoss(CLM):
    name = "detached_loss"

    def compute_loss(self, module, batch):
        out = super().compute_loss(module, batch)
        return {**out, "loss": out["loss"].detach()}


class NoTokens(CLM):
    name = "no_tokens"

    def compute_loss(self, module, batch):
        return {"loss": super().compute_loss(module, batch)["loss"]}


class PackedOnly(CLM):
    name = "packed_only"

    def collate(self, examples, special):
        if len({len(e["input_ids"]) for e in examples}) > 1:
            raise LmforgeError("packed_only needs packed rows (data.packing: true).")
        return super().collate(examples, special)


class RefusesEverything(CLM):
    name = "refuses_everything"

    def check_architecture(self, architecture):
        raise LmforgeError(f"no architecture is good enough, not even {architecture.name}.")


def test_objective_defects():
    report, checks, _ = report_of(HoldsALambda)
    assert checks["picklable (data-loader workers)"].status == "fail"
    assert "<lambda>" in checks["picklable (data-loader workers)"].detail
    assert report.count("pass") >= 8  # training still runs in this process
    _, _, trained = report_of(DetachedLoss)
    assert trained["finite loss"].status == "fail" and "does not require grad" in trained["finite loss"].detail
    _, _, trained = report_of(NoTokens)
    assert trained["finite loss"].status == "fail" and "without 'loss' and 'tokens'" in trained["finite loss"].detail


def test_refused_rows_and_refused_architectures_are_skips_with_the_reason():
    report, _, trained = report_of(PackedOnly)
    assert report.ok, report.format_table()
    assert (
        trained["collate padded rows"].status == "skip"
        and "data.packing: true" in trained["collate padded rows"].detail
    )
    assert trained["optimizer step"].status == "pass"  # the packed batch still trains
    report, _, trained = report_of(RefusesEverything)
    assert report.ok and trained["training"].status == "skip"
    assert "refuses architecture 'gpt': no architecture is good enough" in trained["training"].detail


def test_families_without_a_module_or_without_partners_are_skipped_with_a_line(monkeypatch):
    class EverywhereDecoder(TinyDecoder):
        families = ("encoder", "decoder")

    monkeypatch.delitem(FAMILY_MODULES, "encoder", raising=False)
    report = check_plugin(EverywhereDecoder, partners=[])
    lines = {(r.family, r.check): r for r in report.results}
    assert lines[("encoder", "family")].status == "skip"
    assert "family 'encoder' is not available in this lmforge" in lines[("encoder", "family")].detail
    assert lines[("decoder", "training")].detail == "no reference objective for family decoder"
    assert lines[("decoder", "forward shapes")].status == "pass"  # what needs no partner still runs


def test_the_report_table_and_the_check_command(monkeypatch, tmp_path, capsys):
    (tmp_path / "bad_conformance_plugin.py").write_text(
        "import torch\n"
        "from lmforge import hookimpl\n"
        "from lmforge_plugins.architectures.gpt import GPT\n\n"
        "class Shouty(GPT):\n"
        "    name = 'shouty'\n"
        "    def logits(self, hidden):\n"
        "        return super().logits(hidden) * float('inf')\n\n"
        "@hookimpl\n"
        "def lmforge_architectures():\n"
        "    return [Shouty]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("LMFORGE_PLUGINS", "bad_conformance_plugin")
    assert main(["plugins", "check", "shouty"]) == 1
    out = capsys.readouterr().out
    header, columns = out.splitlines()[:2]
    assert header == "architecture 'shouty' (bad_conformance_plugin.Shouty), loaded through $LMFORGE_PLUGINS"
    assert columns.split() == ["family", "check", "result", "detail"]
    assert any(line.split()[:3] == ["decoder", "finite", "loss"] and "FAIL" in line for line in out.splitlines())
    assert out.rstrip().endswith("DOES NOT CONFORM")
    assert main(["plugins", "check", "gpt", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["ok"] is True
    with pytest.raises(AssertionError, match="(?s)does not conform.*shouty.*FAIL"):
        assert_conforms("shouty")
    assert main(["plugins", "check", "shoutyy"]) == 2
    assert "No plugin is called 'shoutyy'. Did you mean 'shouty'?" in capsys.readouterr().err


def test_check_plugin_leaves_the_caller_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    check_plugin(TinyDecoder)
    assert torch.equal(torch.rand(3), expected) and torch.get_num_threads() == threads


def test_a_task_is_checked_in_its_family_module():
    from lmforge import Task

    class Echo(Task):
        name = "echo"
        families = ("decoder",)

        def __init__(self, prefix: str = "x") -> None:
            self.prefix = prefix

        def predict_step(self, module, batch):
            return {"ids": batch["input_ids"]}

    class Silent(Echo):
        name = "silent"

        def predict_step(self, module, batch):
            return None

    report = assert_conforms(Echo)
    assert {r.check: r.status for r in report.results}["predict_step"] == "pass"
    report = check_plugin(Silent)
    assert {r.check: r.status for r in report.results}["predict_step"] == "fail"


def test_unknown_kind_and_kind_mismatch_are_errors():
    with pytest.raises(LmforgeError, match="Unknown plugin kind 'architectur'. Did you mean 'architecture'"):
        check_plugin("gpt", kind="architectur")
    with pytest.raises(LmforgeError, match="CLM is a plugin of kind 'objective', not 'architecture'"):
        check_plugin(CLM, kind="architecture")
    with pytest.raises(LmforgeError, match=r"Unknown objective 'gpt'"):
        check_plugin("gpt", kind="objective")
    with pytest.raises(LmforgeError, match="not an lmforge Architecture, Objective or Task"):
        check_plugin(types.SimpleNamespace)


def test_partners_by_name(capsys):
    report = check_plugin("gpt", partners=["clm", "gpt"])  # names of any kind; only objectives pair with gpt
    assert {r.partner for r in report.results if r.partner} == {"clm"}
    trained = {r.check: r for r in report.results}["every parameter trained"]
    assert trained.status == "skip" and "built-in objectives" in trained.detail
    with pytest.raises(LmforgeError, match="No plugin is called 'clmm'. Did you mean 'clm'"):
        check_plugin("gpt", partners=["clmm"])
    assert main(["plugins", "check", "clm", "--partner", "gpt", "--json"]) == 0
    [report] = json.loads(capsys.readouterr().out)
    assert report["ok"] and {r["partner"] for r in report["results"] if r["partner"]} == {"gpt"}
