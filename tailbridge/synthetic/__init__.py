"""Demo data for a shop that has none: generate -> simulate -> replay.

1. generate (``catalog``): a catalog built from a hand-written taxonomy (``taxonomy.json``),
   queries in head / torso / tail strata with graded judgements, a train/test split and shopper
   personas, written as a BEIR data set (``tailbridge data synth``).
2. simulate (``shoppers``): shopper sessions over that data -- searches, impressions, clicks,
   carts, purchases -- as the validated events of ``streams.events``, and the catalog as
   upserts. Offline, ``feedback`` turns sessions over the training queries into a feedback log
   for training (``tailbridge train ... --simulate-feedback N``).
3. replay (``replay``): publish the catalog and the simulated sessions to Kafka for the stream
   worker (``tailbridge data replay``; ``tailbridge demo``).

Models never import this package: they read the files it writes.
"""
