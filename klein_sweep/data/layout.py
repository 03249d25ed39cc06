"""The training folder's layout, the one place that names it: which files are images, which are
captions, and the placeholder a caption writes for the trigger word. No imports: the config layer
and the evaluation prompts read it too."""

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSION = ".txt"
TRIGGER_PLACEHOLDER = "[trigger]"
