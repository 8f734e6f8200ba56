"""Model card templates (Jinja2), installed as the package data of ``lqf_hub.model_cards``."""
