"""Models loaded from checkpoints skip random initialisation, without affecting anything else."""
import threading

import torch

from micro_sam.models.build_sam import build_sam_vit_t, skip_weight_init


def test_skip_weight_init_is_scoped_to_the_context_and_thread():
    original = torch.nn.init.kaiming_uniform_
    other = {}

    def build_elsewhere():
        torch.manual_seed(0)
        other["layer"] = torch.nn.Linear(4, 4)

    with skip_weight_init():
        layer = torch.nn.Linear(4, 4)
        with torch.no_grad():
            layer.weight.fill_(7.0)
            torch.nn.init.kaiming_uniform_(layer.weight)  # does nothing here
        assert torch.all(layer.weight == 7.0)
        thread = threading.Thread(target=build_elsewhere)
        thread.start()
        thread.join()
    torch.manual_seed(0)
    torch.testing.assert_close(other["layer"].weight, torch.nn.Linear(4, 4).weight)  # initialised normally
    assert torch.nn.init.kaiming_uniform_ is original


def test_checkpoint_loading_gives_the_stored_weights(tmp_path):
    torch.manual_seed(0)
    model = build_sam_vit_t(image_size=256)
    path = tmp_path / "vit_t.pt"
    torch.save(model.state_dict(), path)
    loaded = build_sam_vit_t(path, image_size=256)
    for (name, value), (_, expected) in zip(loaded.state_dict().items(), model.state_dict().items()):
        assert torch.equal(value, expected), name
    torch.testing.assert_close(loaded.pixel_mean, model.pixel_mean)  # a non-persistent buffer
