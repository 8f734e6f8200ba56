"""``lqf-hub demo``: a page where anyone sees why a solved model says what it says, and what forgetting changes.

``session.py`` computes (no web framework needed); ``page.py`` lays it out with Gradio (``pip install
lqf-hub[demo]``); ``space.py`` writes what a Hugging Face Space needs to serve the page for a model on the Hub.
"""

from .session import DemoSession, Prediction

__all__ = ["DemoSession", "Prediction"]
