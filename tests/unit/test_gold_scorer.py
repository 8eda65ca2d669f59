"""The demo's gold scorer: deterministic, and it ranks replies the way the house style says."""

from rlhf.judges import gold_score

PROMPT = [{"role": "system", "content": "You are a support assistant."},
          {"role": "user", "content": "My order #LH-4411 arrived with a cracked lamp base. What now?"}]
GOOD = ("Sorry about the cracked lamp base! Damaged items ship back free: reply with your order number and a photo, "
        "and we'll email a prepaid label within 24 hours.")


def test_the_house_style_reply_beats_each_way_of_failing_it():
    good = gold_score(PROMPT, GOOD)
    rude = gold_score(PROMPT, "Not my problem. Deal with it.")
    rambling = gold_score(PROMPT, GOOD + " " + " ".join(["Lamps are lovely and bright."] * 20))
    off_topic = gold_score(PROMPT, "Thanks for asking! Our sofas come in six colours; you can browse them online.")
    no_step = gold_score(PROMPT, "Oh no, a cracked lamp base. That is unfortunate.")
    evasive = gold_score(PROMPT, "As an AI language model I cannot help with a cracked lamp order.")
    assert good > max(rude, rambling, off_topic, no_step, evasive)
    assert rude < 0 and gold_score(PROMPT, "") < rude


def test_it_is_a_pure_function_of_its_inputs():
    assert gold_score(PROMPT, GOOD) == gold_score(list(PROMPT), str(GOOD))
    # It reads only the last user turn for relevance: an unrelated system prompt changes nothing.
    other = [{"role": "system", "content": "Different words entirely."}, PROMPT[1]]
    assert gold_score(other, GOOD) == gold_score(PROMPT, GOOD)
