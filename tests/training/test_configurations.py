import pytest

from micro_sam.training import CONFIGURATIONS, find_best_configuration, get_training_configuration
from micro_sam.training import configurations


@pytest.mark.parametrize("resource,expected", [
    ("CPU_32GB", ("vit_b", 1, 10, [])),
    ("CPU", ("vit_b", 1, 10, [])),
    ("cpu_64gb", ("vit_b", 1, 15, [])),
    ("GTX1080Ti", ("vit_b", 1, 10, ["image_encoder"])),
    ("gtx1080", ("vit_b", 1, 10, ["image_encoder"])),
    ("RTX5000", ("vit_b", 1, 10, [])),
    ("rtx5000", ("vit_b", 1, 10, [])),
    ("V100", ("vit_b", 1, 10, [])),
    ("A100", ("vit_b", 2, 40, [])),
])
def test_default_rows(resource, expected):
    config = get_training_configuration(resource)
    assert (config["model_type"], config["batch_size"], config["n_objects_per_batch"], config["freeze"]) == expected


@pytest.mark.parametrize("model_type,objects", [("vit_t", 50), ("vit_b", 40), ("vit_l", 30), ("vit_h", 25),
                                                ("vit_b_lm", 40), ("vit_t_lm", 50)])
def test_a100_rows(model_type, objects):
    config = get_training_configuration("A100", model_type)
    assert config == {"model_type": model_type[:5], "batch_size": 2, "n_objects_per_batch": objects, "freeze": []}


def test_results_are_independent_copies():
    first = get_training_configuration("GTX1080Ti")
    first["freeze"].append("mask_decoder")
    assert get_training_configuration("GTX1080Ti")["freeze"] == ["image_encoder"]


def test_unknown_resource_lists_tested_ones():
    with pytest.raises(ValueError, match="Unknown training resource 'TPU'.*CPU_32GB.*A100"):
        get_training_configuration("TPU")
    with pytest.raises(ValueError, match="Unknown training resource"):
        get_training_configuration(None)


def test_untested_model_type_lists_tested_ones():
    with pytest.raises(ValueError, match="vit_h.*not tested on the resource 'V100'.*vit_b"):
        get_training_configuration("V100", "vit_h")
    with pytest.raises(ValueError, match="tested model types: vit_t, vit_b, vit_l, vit_h"):
        get_training_configuration("A100", "vit_x")


def test_configurations_mirror_the_table():
    assert set(CONFIGURATIONS) == {"CPU", "CPU_64GB", "gtx1080", "rtx5000", "V100", "A100"}
    for name, settings in CONFIGURATIONS.items():
        assert settings == get_training_configuration(name)
    assert len(configurations.HARDWARE_TABLE) == 9


@pytest.mark.parametrize("gpu,ram,expected", [
    (None, 16.0, "CPU"),             # less RAM than any row: the closest row is the 32 GB one
    (None, 33.6, "CPU"),             # a "32 GB" machine
    (None, 68.0, "CPU_64GB"),
    (None, 512.0, "CPU_64GB"),
    (("NVIDIA GeForce GTX 1080 Ti", 11.7), 64.0, "gtx1080"),
    (("Quadro RTX 5000", 16.9), 64.0, "rtx5000"),
    (("Tesla V100-SXM2-32GB", 34.1), 64.0, "V100"),
    (("NVIDIA A100-SXM4-80GB", 85.0), 64.0, "A100"),
    (("NVIDIA H200", 150.0), 64.0, "A100"),         # unknown name: by memory
    (("NVIDIA GeForce RTX 4090", 25.4), 64.0, "rtx5000"),
    (("NVIDIA L4", 23.0), 16.0, "rtx5000"),
    (("NVIDIA T1000", 4.0), 64.0, "CPU_64GB"),      # too small a GPU: CPU rows
])
def test_closest_configuration(monkeypatch, gpu, ram, expected):
    monkeypatch.setattr(configurations, "_gpu_info", lambda: gpu)
    monkeypatch.setattr(configurations, "_system_memory_gb", lambda: ram)
    assert find_best_configuration() == expected
    canonical = configurations.resolve_resource(expected)
    assert find_best_configuration(use_micro_sam_names=False) == canonical


def test_closest_configuration_runs_on_this_machine():
    name = find_best_configuration()
    assert name in CONFIGURATIONS
