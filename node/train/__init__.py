"""The pure-torch core: model, data, inner optimizer, reference trainer, evaluation, export."""
