"""Open-vocabulary label matching with hand-made embeddings and labels."""

import numpy as np
import pytest

from blueglass.evaluation.label_matching import LabelMatcher, ngram_embed, normalise_label

# dataset classes 1 cat, 2 dog, 7 car (ids need not be contiguous)
TARGET_IDS = [1, 2, 7]
TARGET = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
# sources: a kitten (close to cat), a puppy-ish label between cat and dog, a truck (close to car), a cloud (nothing)
SOURCE = np.array([[0.9, 0.1, 0.0], [0.6, 0.8, 0.0], [0.0, 0.2, 0.98], [0.1, 0.1, -1.0]], np.float32)


def test_top1_mapping_and_oov_threshold():
    m = LabelMatcher.from_embeddings(SOURCE, TARGET, TARGET_IDS, oov_threshold=0.5)
    assert m.weights.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]]
    assert m.out_of_vocabulary.tolist() == [3]
    # a stricter threshold makes the ambiguous label (sim 0.8 to dog) out of vocabulary too
    strict = LabelMatcher.from_embeddings(SOURCE, TARGET, TARGET_IDS, oov_threshold=0.85)
    assert strict.out_of_vocabulary.tolist() == [1, 3]


def test_top_k_and_score_scaling():
    m = LabelMatcher.from_embeddings(
        SOURCE, TARGET, TARGET_IDS, top_k=2, oov_threshold=0.5, score_scaling="similarity"
    )
    sim = m.similarity
    assert np.isclose(sim[1, 0], 0.6) and np.isclose(sim[1, 1], 0.8)  # embeddings are re-normalised
    assert np.allclose(m.weights[1], [0.6, 0.8, 0.0])  # both neighbours pass 0.5, weighted by similarity
    # scores over sources → scores over classes (max over sources of score × weight)
    scores = np.array([[0.5, 1.0, 0.2, 0.9]], np.float32)
    assert np.allclose(m.map_scores(scores), [[max(0.5 * m.weights[0, 0], 0.6), 0.8, 0.2 * m.weights[2, 2]]])
    # labelled predictions: one entry per mapped class, OOV dropped, scores scaled
    idx, cats, sc = m.map_labels(np.array([1, 3, 2]), np.array([1.0, 1.0, 0.5]))
    assert idx.tolist() == [0, 0, 2] and cats.tolist() == [1, 2, 7]
    assert np.allclose(sc, [0.6, 0.8, 0.5 * m.weights[2, 2]])
    unscaled = LabelMatcher.from_embeddings(SOURCE, TARGET, TARGET_IDS, top_k=2, score_scaling="none")
    assert np.allclose(unscaled.map_labels(np.array([1]), np.array([0.7]))[2], [0.7, 0.7])
    with pytest.raises(ValueError, match="score_scaling"):
        LabelMatcher.from_embeddings(SOURCE, TARGET, TARGET_IDS, score_scaling="softmax")


def test_labels_exact_names_win_and_spelling_variants_match():
    names = ["person", "traffic light", "airplane", "dining table", "tv"]
    src = [
        "Person",
        "a photo of a traffic_light.",
        "aeroplane",
        "dining-table",
        "tvmonitor",
        "N/A",
        "__background__",
    ]
    m = LabelMatcher.from_labels(src, names, [1, 10, 5, 67, 72], oov_threshold=0.5)
    table = m.table(src, names)
    assert table["Person"] == ["person"] and table["a photo of a traffic_light."] == ["traffic light"]
    assert table["dining-table"] == ["dining table"] and table["aeroplane"] == ["airplane"]
    # trigrams only catch spelling variants: 'tvmonitor' → 'tv' needs a text encoder (or a lower threshold)
    assert table["tvmonitor"] == [] and table["N/A"] == [] and table["__background__"] == []
    assert m.similarity[0, 0] == 1.0


def test_labels_with_a_custom_text_encoder():
    vocab = {"kitten": [1, 0.1], "cat": [1, 0], "hound": [0.1, 1], "dog": [0, 1]}
    m = LabelMatcher.from_labels(
        ["kitten", "hound"], ["cat", "dog"], [3, 4], embed=lambda t: np.array([vocab[x] for x in t])
    )
    assert m.map_labels(np.array([0, 1]), np.ones(2))[1].tolist() == [3, 4]


def test_normalisation_and_ngrams():
    assert normalise_label("A photo of a Traffic_Light.") == "traffic light"
    e = ngram_embed(["traffic light", "traffic lights", "zebra"])
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0)
    assert e[0] @ e[1] > 0.8 > e[0] @ e[2]


def test_identity_is_prompts_from_the_dataset():
    m = LabelMatcher.identity([5, 9])
    assert np.allclose(m.map_scores(np.array([[0.2, 0.7]])), [[0.2, 0.7]])
