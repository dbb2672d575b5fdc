"""vzero.recipes.sft: the loss is the answer tokens' NLL (checked against transformers' own label loss), training on
a few labelled crops lowers it, the saved directory is a loadable model that keeps the gain, unlabelled rows are
counted and skipped."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from vzero.data.schema import DatasetWriter
from vzero.data.synth import write_synth
from vzero.eval.evaluate import iter_labeled
from vzero.models.loading import load_model, load_processor
from vzero.recipes.sft import SFTBatcher, sft_loss, train_sft

PIX = {"min_pixels": 56 * 56, "max_pixels": 56 * 56}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 labelled synth rows plus one row without an answer."""
    d = tmp_path_factory.mktemp("sft")
    write_synth(d / "raw.parquet", n=8, seed=5, image_size=112)
    rows = pq.read_table(d / "raw.parquet").to_pylist()
    with DatasetWriter(d / "data.parquet") as w:
        w.write_all([*rows, {**rows[0], "id": "no-label", "answer": None}])
    return d / "data.parquet"


def _batch(model_dir, data):
    rows = [r for r in iter_labeled(data) if not isinstance(r, str)]
    return SFTBatcher(load_processor(model_dir), rows, view="crop", margin=0.25, **PIX).batch(list(range(len(rows))))


def test_sft_loss_is_the_mean_nll_of_answer_and_im_end_tokens(tiny_model, data) -> None:
    batch = _batch(tiny_model, data)
    model = load_model(tiny_model).eval()
    labels = torch.full_like(batch.input_ids, -100)  # transformers' loss over exactly the response tokens
    L = batch.input_ids.shape[1]
    for i, T in enumerate(batch.response_lengths):
        labels[i, L - T :] = batch.input_ids[i, L - T :]
    assert batch.response_lengths == [2] * 8, "one-token answers + <|im_end|>"
    with torch.no_grad():
        ours = sft_loss(model, batch)
        reference = model(**batch.model_inputs(), labels=labels, use_cache=False).loss
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_sft_lowers_the_loss_and_the_saved_model_keeps_it(tiny_model, data, tmp_path) -> None:
    out = tmp_path / "sft-model"
    res = train_sft(tiny_model, out, data, view="crop", steps=30, lr=2e-3, batch_size=8, margin=0.25, **PIX)
    assert res.examples == 8 and res.invalid == {"missing_field:answer": 1}
    assert len(res.losses) == 30
    assert res.losses[-1] < 0.3 * res.losses[0], res.losses[::5]
    batch = _batch(out, data)
    with torch.no_grad():
        before = sft_loss(load_model(tiny_model).eval(), batch)
        after = sft_loss(load_model(out).eval(), batch)
    assert after < 0.3 * before
    assert load_processor(out).tokenizer.get_vocab() == load_processor(tiny_model).tokenizer.get_vocab()
