"""Config loading: YAML + dotted overrides -> a typed SFTConfig; every bad input is a one-line RlhfError."""

from __future__ import annotations

import dataclasses

import pytest

from rlhf.config import SFTConfig, check_passthrough, dump, load_config, valid_keys
from rlhf.errors import RlhfError


def config_error(*args, **kwargs) -> str:
    """The message of the RlhfError that load_config raises; it must be a single line."""
    with pytest.raises(RlhfError) as info:
        load_config(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def write(path, text: str):
    path.write_text(text)
    return path


# -- loading ---------------------------------------------------------------------------------


def test_defaults_load_without_a_file():
    cfg = load_config(SFTConfig)

    assert cfg.model == "base:latest"
    assert cfg.data == "sft:latest"
    assert cfg.output == "sft"
    assert cfg.mode == "lora"
    assert cfg.merge is False
    assert cfg.train.max_steps == -1
    assert cfg.train.batch_size == 8
    assert cfg.train.learning_rate == 2e-4
    assert cfg.train.seed == 42
    assert cfg.lora.r == 16
    assert cfg.lora.target_modules == "all-linear"
    assert cfg.trl == {}


def test_yaml_file_sets_values_and_keeps_other_defaults(tmp_path):
    path = write(tmp_path / "sft.yaml", """
# a comment block, as every shipped config has
model: base:v3
train:
  max_steps: 30
  batch_size: 4
lora:
  r: 4
trl:
  packing: false
""")

    cfg = load_config(SFTConfig, path)

    assert cfg.model == "base:v3"
    assert cfg.train.max_steps == 30
    assert cfg.train.batch_size == 4
    assert cfg.train.learning_rate == 2e-4  # not in the file: default
    assert cfg.lora.r == 4
    assert cfg.lora.alpha == 32
    assert cfg.trl == {"packing": False}


def test_empty_yaml_file_means_defaults(tmp_path):
    path = write(tmp_path / "empty.yaml", "# nothing set here\n")

    assert load_config(SFTConfig, path) == load_config(SFTConfig)


def test_dotted_overrides_are_parsed_as_yaml_values():
    cfg = load_config(SFTConfig, overrides=[
        "train.max_steps=20",
        "lora.r=8",
        "model=sft:v2",
        "train.learning_rate=1e-4",
        "merge=true",
        "train.gradient_checkpointing=false",
        "lora.target_modules=[q_proj,v_proj]",
    ])

    assert cfg.train.max_steps == 20
    assert cfg.lora.r == 8
    assert cfg.model == "sft:v2"
    assert isinstance(cfg.train.learning_rate, float)
    assert cfg.train.learning_rate == 1e-4
    assert cfg.merge is True
    assert cfg.train.gradient_checkpointing is False
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_overrides_win_over_the_file(tmp_path):
    path = write(tmp_path / "sft.yaml", "train:\n  max_steps: 30\n  seed: 7\n")

    cfg = load_config(SFTConfig, path, ["train.max_steps=5"])

    assert cfg.train.max_steps == 5
    assert cfg.train.seed == 7


def test_override_into_passthrough_section():
    cfg = load_config(SFTConfig, overrides=["trl.packing=true", "trl.dataset_num_proc=2"])

    assert cfg.trl == {"packing": True, "dataset_num_proc": 2}


def test_scientific_notation_is_a_float_in_the_passthrough_section(tmp_path):
    # Typed fields coerce '1e-4' themselves; `trl:` is untyped and goes to trl.SFTConfig(**cfg.trl)
    # as is, so the parser must already have made it a number (PyYAML reads 1e-4 as a string).
    path = write(tmp_path / "sft.yaml", "trl:\n  weight_decay: 1e-4\n")

    from_file = load_config(SFTConfig, path).trl
    from_override = load_config(SFTConfig, overrides=["trl.weight_decay=1e-4"]).trl

    assert from_file == {"weight_decay": 1e-4}
    assert isinstance(from_file["weight_decay"], float)
    assert from_override == {"weight_decay": 1e-4}
    assert isinstance(from_override["weight_decay"], float)


def test_dump_round_trips():
    cfg = load_config(SFTConfig, overrides=["lora.target_modules=[q_proj]", "train.max_steps=3"])

    dumped = dump(cfg)

    assert dumped["train"]["max_steps"] == 3
    assert dumped["lora"]["target_modules"] == ["q_proj"]
    assert SFTConfig.model_validate(dumped) == cfg


def test_valid_keys_are_dotted():
    keys = valid_keys(SFTConfig)

    assert "train.max_steps" in keys
    assert "lora.r" in keys
    assert "model" in keys
    assert "trl" in keys


# -- unknown keys, wrong types, contradictions ----------------------------------------------------


def test_unknown_nested_key_names_it_and_suggests_the_close_one():
    message = config_error(SFTConfig, overrides=["train.max_step=20"])

    assert "'train.max_step'" in message
    assert "did you mean 'train.max_steps'" in message


def test_unknown_top_level_key_names_it_and_suggests_the_close_one():
    message = config_error(SFTConfig, overrides=["modle=base:v1"])

    assert "unknown key 'modle'" in message
    assert "model" in message.split("did you mean", 1)[1]


def test_unknown_key_in_a_yaml_file_names_the_file(tmp_path):
    path = write(tmp_path / "sft.yaml", "train:\n  max_step: 20\n")

    message = config_error(SFTConfig, path)

    assert str(path) in message
    assert "'train.max_step'" in message
    assert "train.max_steps" in message


def test_wrong_type_names_the_key_and_the_value():
    message = config_error(SFTConfig, overrides=["train.max_steps=lots"])

    assert message.startswith("config (command line): train.max_steps:")
    assert "'lots'" in message


def test_wrong_literal_names_the_key():
    message = config_error(SFTConfig, overrides=["mode=half"])

    assert "mode:" in message
    assert "'half'" in message


def test_out_of_range_value_names_the_key():
    message = config_error(SFTConfig, overrides=["train.batch_size=0"])

    assert "train.batch_size:" in message


def test_full_mode_with_merge_is_a_contradiction():
    message = config_error(SFTConfig, overrides=["mode=full", "merge=true"])

    assert "merge=true only applies to the adapter modes (lora, qlora, peft)" in message
    assert "Value error" not in message


def test_merge_with_lora_is_fine():
    assert load_config(SFTConfig, overrides=["mode=lora", "merge=true"]).merge is True


# -- fine-tuning modes, data mixes, early stopping ----------------------------------------------


def test_peft_options_pass_through_and_round_trip():
    cfg = load_config(SFTConfig, overrides=["mode=peft", "peft.method=prompt_tuning", "peft.num_virtual_tokens=8"])

    assert cfg.peft.method == "prompt_tuning"
    assert cfg.peft.options == {"num_virtual_tokens": 8}
    assert SFTConfig.model_validate(dump(cfg)) == cfg


def test_a_list_of_datasets_with_weights():
    cfg = load_config(SFTConfig, overrides=["data=[a:latest, b:v2]", "data_weights=[0.7, 0.3]"])

    assert cfg.data_refs == ["a:latest", "b:v2"]
    assert cfg.data_weights == [0.7, 0.3]


@pytest.mark.parametrize("overrides, expected", [
    (["data=[a:latest, b:v2]", "data_weights=[0.7, 0.2, 0.1]"],
     "data_weights has 3 weight(s) but data names 2 dataset(s); give one weight per dataset"),
    (["data_weights=[0.5, 0.5]"], "data_weights has 2 weight(s) but data names 1 dataset(s)"),
    (["data=[a:latest, b:v2]", "data_weights=[1, 0]"], "data_weights must all be positive"),
    (["data=[a:latest, a:latest]"], "data lists a dataset twice"),
    (["data=[]"], "data is an empty list"),
    (["data_stopping_strategy=first_exhausted"], "data_stopping_strategy applies only with data_weights"),
    (["freeze.trainable_layers=2"], "freeze.* settings apply only to mode=freeze, but mode=lora; add mode=freeze"),
    (["peft.method=ia3"], "peft.* settings apply only to mode=peft, but mode=lora; add mode=peft"),
    (["mode=freeze", "freeze.trainable_layers=-1"], "freeze.trainable_layers:"),
    (["mode=freeze", "freeze.trainable_layers=1", "merge=true"], "merge=true only applies to the adapter modes"),
    (["mode=freeze"], "mode=freeze needs freeze.trainable_layers=N"),
    (["mode=peft"], "mode=peft needs peft.method"),
    (["train.early_stopping_patience=3"], "train.early_stopping_patience needs evaluations during training; "
                                          "set train.eval_steps too"),
    (["train.early_stoping_patience=3"], "did you mean 'train.early_stopping_patience'"),
])
def test_bad_finetune_settings_are_one_line_errors_that_name_the_fix(overrides, expected):
    message = config_error(SFTConfig, overrides=overrides)

    assert expected in message
    assert "Value error" not in message


def test_early_stopping_with_evaluations_loads():
    cfg = load_config(SFTConfig, overrides=["train.eval_steps=5", "train.early_stopping_patience=2"])

    assert cfg.train.early_stopping_patience == 2


# -- bad files and bad overrides --------------------------------------------------------------


def test_missing_config_file(tmp_path):
    message = config_error(SFTConfig, tmp_path / "nope.yaml")

    assert "nope.yaml not found" in message


def test_invalid_yaml(tmp_path):
    path = write(tmp_path / "bad.yaml", "train:\n  max_steps: [1, 2\nlora: {\n")

    message = config_error(SFTConfig, path)

    assert message.startswith(f"{path}: not valid YAML")


def test_yaml_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path / "list.yaml", "- model\n- data\n")

    message = config_error(SFTConfig, path)

    assert message == f"{path}: the top level must be a mapping of config keys"


def test_override_without_equals_sign():
    message = config_error(SFTConfig, overrides=["train.max_steps"])

    assert "'train.max_steps' is not key=value" in message


def test_override_with_empty_key():
    message = config_error(SFTConfig, overrides=["=3"])

    assert "is not key=value" in message


def test_override_through_a_non_section():
    message = config_error(SFTConfig, overrides=["model=base:v1", "model.name=x"])

    assert message == "override 'model.name=x': 'model' is not a section"


# -- library pass-through ---------------------------------------------------------------------


@dataclasses.dataclass
class FakeTrainerArgs:
    learning_rate: float = 1e-3
    max_length: int = 1024
    packing: bool = False


def test_passthrough_accepts_the_library_fields():
    check_passthrough("trl", {"max_length": 256, "packing": True}, FakeTrainerArgs)


def test_passthrough_rejects_an_unknown_field_with_a_suggestion():
    with pytest.raises(RlhfError) as info:
        check_passthrough("trl", {"packing": True, "max_lenght": 256}, FakeTrainerArgs)

    message = str(info.value)
    assert "'trl.max_lenght'" in message
    assert "FakeTrainerArgs" in message
    assert "did you mean 'trl.max_length'" in message
    assert "\n" not in message
