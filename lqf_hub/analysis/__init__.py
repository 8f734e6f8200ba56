"""What only a model at its optimum can say: each prediction split exactly over the training images
(``explain``), and the optimum without some of them (``forget``)."""

from .explain import Explainer, training_images, training_trunk
from .forget import forget

__all__ = ["Explainer", "forget", "training_images", "training_trunk"]
