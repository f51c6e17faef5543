"""The task API: seeded instances from reasoning-gym and the verifier plugins that score completions."""

from __future__ import annotations

import pytest

from rayfleet.actors.tasks import FAMILIES, accepted, extract_answer, generate, mixture, score, verifier_for


def test_same_seed_gives_the_same_instance():
    assert generate("chain_sum", "hard", seed=11, count=3) == generate("chain_sum", "hard", seed=11, count=3)
    [alone] = generate("chain_sum", "hard", seed=12)
    assert generate("chain_sum", "hard", seed=11, count=3)[1] == alone


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_verifier_accepts_the_reference_answer_and_rejects_a_wrong_one(name):
    for difficulty in ("easy", "hard"):
        for instance in generate(name, difficulty, seed=3, count=5):
            assert score(instance, instance.answer) == 1.0
            assert score(instance, f"  {instance.answer}\nsome trailing text") == 1.0
            assert score(instance, "zzz") == 0.0


def test_answer_tag_is_extracted():
    assert extract_answer("thinking...\n<answer> 42 </answer>") == "42"
    assert extract_answer("17\n18") == "17"


def test_hard_instances_are_longer_than_easy_ones():
    for name in FAMILIES:
        easy = generate(name, "easy", seed=0, count=50)
        hard = generate(name, "hard", seed=0, count=50)
        assert sum(len(i.prompt) + len(i.answer) for i in hard) > sum(len(i.prompt) + len(i.answer) for i in easy)


def test_mixture_follows_its_weights_reproducibly():
    cells = {("chain_sum", "easy"): 3.0, ("spell_backward", "hard"): 1.0}
    drawn = mixture(cells, seed=5, count=400)
    assert drawn == mixture(cells, seed=5, count=400)
    share = sum(i.family == "chain_sum" for i in drawn) / len(drawn)
    assert 0.65 < share < 0.85


def test_verifiers_are_entry_point_plugins():
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="rayfleet.verifiers")}
    assert "reasoning_gym" in names
    [instance] = generate("products", "easy", seed=1)
    assert type(verifier_for(instance)).__name__ == "ReasoningGymVerifier"
    assert accepted(instance, instance.answer)


def test_unknown_family_or_difficulty_names_the_choices():
    with pytest.raises(ValueError, match="allowed: chain_sum"):
        generate("nope", "easy", seed=0)
    with pytest.raises(ValueError, match="allowed: easy, hard"):
        generate("chain_sum", "medium", seed=0)
