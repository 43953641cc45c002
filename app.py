"""Entry point for `python app.py` and Hugging Face Spaces (README front matter: app_file: app.py).

Works offline: without the default model's weights the page falls back to the tiny demo model
trained on synthetic videos. Environment: PRUNEVID_MODEL picks the model (`tiny-trained` = the
offline one, `tiny` = random weights), GRADIO_SERVER_NAME / GRADIO_SERVER_PORT choose where to
listen; the limits of a public server (cache bytes, uploads, resident models) are in the README,
"Deploy as a Space".
"""

import contextlib

# On ZeroGPU, `spaces` must patch torch before any model is loaded; elsewhere importing it changes nothing.
with contextlib.suppress(ImportError):
    import spaces  # noqa: F401

from prunevid.app import launch

if __name__ == "__main__":
    launch()
