import numpy as np
import pytest

from micro_sam.evaluation.point_prompts import object_interior_points, point_prompt_ious


def test_interior_points_known_answers():
    labels = np.zeros((40, 60), dtype="uint32")
    labels[5:16, 5:16] = 1                      # square: centre pixel (10, 10)
    yy, xx = np.mgrid[:40, :60]
    ring = ((yy - 25) ** 2 + (xx - 40) ** 2 <= 12 ** 2) & ((yy - 25) ** 2 + (xx - 40) ** 2 > 6 ** 2)
    labels[ring] = 2                            # ring: its centroid (25, 40) is background
    labels[30:40, 0:3] = 3                      # touches the image border
    points = object_interior_points(labels)
    assert points[1] == (10, 10)
    for object_id, (y, x) in points.items():
        assert labels[y, x] == object_id
    assert labels[25, 40] == 0
    with pytest.raises(ValueError, match="2D"):
        object_interior_points(labels[None])


def test_point_prompt_ious_equal_segment_anythings_predict(tiny_predictor):
    from micro_sam.sample_data import synthetic_nuclei_2d

    from micro_sam.util import precompute_image_embeddings, set_precomputed

    image, labels = synthetic_nuclei_2d((128, 160), n_objects=6, seed=3)
    embeddings = precompute_image_embeddings(tiny_predictor, image, verbose=False)
    ious = point_prompt_ious(tiny_predictor, image, labels, image_embeddings=embeddings, batch_size=4)
    assert sorted(ious) == sorted(int(i) for i in np.unique(labels) if i)
    assert point_prompt_ious(tiny_predictor, image, labels, batch_size=1) == ious
    set_precomputed(tiny_predictor, embeddings)
    for object_id, (y, x) in object_interior_points(labels).items():
        masks, scores, _ = tiny_predictor.predict(np.array([[x, y]]), np.array([1]), multimask_output=True)
        mask, truth = masks[int(np.argmax(scores))], labels == object_id
        expected = (mask & truth).sum() / max((mask | truth).sum(), 1)
        assert ious[object_id] == pytest.approx(expected, abs=1e-6)
