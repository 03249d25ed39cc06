"""The mini world's evaluation prompts: its creatures' words, as its captions use them. A sweep
on the mini (or the random tiny) model is judged by these; a real model gets prompts built for
the user's own subject (klein_sweep.evaluation.prompts)."""

TRIGGER_PROMPTS = [
    "photo of a [trigger] creature",
    "photo of a [trigger] creature with two eyes on a white background",
    "photo of a [trigger] creature with a hat on a sky background",
    "photo of a [trigger] creature on a night background",
]
# No trigger: what the base model must still draw (8 prompts x 4 seeds = 32 prior samples).
PRIOR_PROMPTS = [
    "a red circle creature",
    "a blue square creature on a sky background",
    "a yellow triangle creature with a hat",
    "a green striped hexagon creature",
    "a purple dotted diamond creature",
    "a orange star creature on a sand background",
    "a pink circle creature with one eye",
    "a teal square creature on a mint background",
]
