"""Synthetic worlds whose truth is known: rendered media with captions, held-out combinations and referees.

- ``shapes``: coloured shapes, still or moving (the drawing and palette every world shares)
- ``demo``: the corpus of ``accord demo`` (shapes, moving shapes, tones, pairs, real media)
- ``attributes``: captions by colour / shape / position / motion and one-attribute-wrong variants (fusion study)
- ``paraphrases``: training vs held-out wording of the same classes (recipe study)
- ``scenes``: the captioning world (1-3 objects with size, colour, shape and relations, several phrasings)
- ``referee``: parses captions of the captioning world back and scores them against the rendered truth
"""
