"""The greedy sampler that reads the logits: the same tokens as keras-hub's."""

import keras_hub
import numpy as np
from keras import ops

from keras_qwenvl import QwenVLCausalLM
from keras_qwenvl import QwenVLGreedySampler
from keras_qwenvl.samplers import first_index_of_maximum
from tests.test_model import tiny_backbone


def test_first_index_of_maximum_is_argmax_with_ties_and_nans():
    rng = np.random.default_rng(0)
    # Small integers: many rows hold their maximum more than once.
    values = rng.integers(-3, 4, (64, 37)).astype("float32")
    values[5, [3, 9]] = np.nan  # argmax gives the first NaN
    values[6, -1] = np.nan
    values[7] = -np.inf
    expected = [
        int(np.flatnonzero(np.isnan(row))[0]) if np.isnan(row).any()
        else int(np.argmax(row))
        for row in values
    ]
    found = ops.convert_to_numpy(first_index_of_maximum(values))
    assert found.tolist() == expected
    assert len(set(found.tolist())) > 5  # not one index for every row


def test_greedy_generation_equals_keras_hubs_sampler():
    backbone = tiny_backbone(vision=False)
    causal_lm = QwenVLCausalLM(backbone)
    rng = np.random.default_rng(1)
    ids = np.zeros((3, 20), "int32")
    lengths = [6, 3, 9]
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(0, 200, length)
    mask = (np.arange(20)[None] < np.array(lengths)[:, None]).astype("int32")
    inputs = {"token_ids": ids, "padding_mask": mask}

    causal_lm.compile(sampler="greedy")
    assert isinstance(causal_lm.sampler, QwenVLGreedySampler)
    ours = ops.convert_to_numpy(causal_lm.generate_step(inputs)["token_ids"])
    causal_lm.compile(sampler=keras_hub.samplers.GreedySampler())
    theirs = ops.convert_to_numpy(
        causal_lm.generate_step(inputs)["token_ids"]
    )
    np.testing.assert_array_equal(ours, theirs)
    assert (ours[:, 9:] != 0).any()  # tokens were generated
