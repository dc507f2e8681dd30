"""The tiny fleet's data, warm-up and local training, shared by the Flower tests.

One definition on purpose: the corpus and the warm model are cached by a fingerprint of these
sections, so every module that uses them reuses what the first one built.
"""

TINY_FLEET = {
    "data": {"corpus": {"voices": 3, "variants_per_voice": 2, "clips_per_word": 1, "unknown_per_speaker": 2,
                        "silence_clips": 12}},
    "warm": {"epochs": 1, "early_exit_epochs": 1, "batch_size": 16},
    "training": {"local_epochs": 1, "batch_size": 8},
}
