"""Entry point for `python app.py` and Hugging Face Spaces (README front matter: app_file: app.py).

Works offline: without the default model's weights the page falls back to the tiny demo model.
Environment: PRUNEVID_MODEL picks the model (`tiny` = offline), GRADIO_SERVER_NAME / GRADIO_SERVER_PORT
choose where to listen.
"""

from app import launch

if __name__ == "__main__":
    launch()
