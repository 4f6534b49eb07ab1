import pytest

from nnunetv2_em.errors import EMInputError
from nnunetv2_em.settings import EMSettings


def test_defaults_apply_without_an_em_block():
    settings = EMSettings.resolve(None, source="plans.json")
    assert settings == EMSettings()
    assert settings.total_epochs == 1000  # vanilla nnU-Net's budget


def test_plans_block_then_trainer_overrides():
    settings = EMSettings.resolve({"version": 1, "rounds": 4, "change_threshold": 0.95}, {"rounds": 2},
                                  source="plans.json")
    assert settings.rounds == 2
    assert settings.change_threshold == 0.95
    assert EMSettings.resolve(settings.to_plans_block(), source="x") == settings


@pytest.mark.parametrize("block, key", [
    ({"rounds": 0}, "rounds"),
    ({"epochs_per_round": -3}, "epochs_per_round"),
    ({"change_threshold": 0.4}, "change_threshold"),
    ({"keep_threshold": 1.5}, "keep_threshold"),
    ({"tolerance": -0.1}, "tolerance"),
    ({"min_model_dice": 2}, "min_model_dice"),
    ({"rounds": "three"}, "rounds"),
    ({"rounds": 2.5}, "rounds"),
    ({"mirroring": 1}, "mirroring"),
    ({"roundz": 3}, "roundz"),
    ({"noise_model": "per_voxel"}, "noise_model"),
    ({"noise_model": 1}, "noise_model"),
    ({"case_prior_strength": -5}, "case_prior_strength"),
    ({"boundary_band_width": 0}, "boundary_band_width"),
])
def test_impossible_values_name_the_file_the_key_and_the_fix(block, key):
    with pytest.raises(EMInputError) as error:
        EMSettings.resolve(block, source="/data/nnUNetPlans.json")
    message = str(error.value)
    assert "/data/nnUNetPlans.json" in message
    assert f"em.{key}" in message
    assert "Fix:" in message


def test_a_non_object_block_is_rejected():
    with pytest.raises(EMInputError, match="must be a JSON object"):
        EMSettings.resolve([1, 2], source="plans.json")


def test_a_wrong_type_in_the_plans_is_reported_even_where_a_variant_overrides_the_key():
    with pytest.raises(EMInputError) as error:
        EMSettings.resolve({"rounds": "two", "max_ignored_share": 0.3}, {"rounds": 2}, source="/data/plans.json")
    assert "/data/plans.json" in str(error.value) and "em.rounds" in str(error.value)
    with pytest.raises(EMInputError, match="max_ignored_share"):
        EMSettings.resolve({"max_ignored_share": 0.0}, source="plans.json")


def test_the_noise_model_setting_selects_the_per_case_prior():
    assert EMSettings().per_case_prior_strength == 100.0  # per-case models by default
    settings = EMSettings.resolve({"noise_model": "per_case", "case_prior_strength": 30}, source="plans.json")
    assert settings.per_case_prior_strength == 30.0
    assert EMSettings.resolve({"noise_model": "global"}, source="plans.json").per_case_prior_strength is None


def test_the_boundary_noise_models_select_bands_and_the_per_case_prior():
    assert EMSettings().band_width is None
    boundary = EMSettings.resolve({"noise_model": "boundary", "boundary_band_width": 3}, source="plans.json")
    assert (boundary.band_width, boundary.per_case_prior_strength) == (3.0, None)
    both = EMSettings.resolve({"noise_model": "boundary_per_case"}, source="plans.json")
    assert (both.band_width, both.per_case_prior_strength) == (2.0, 100.0)
