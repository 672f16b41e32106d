"""Building: carrying out a plan, one Core ML file per backbone and per classifier.

Networks are written from the weights through one walker and one layer registry
(:mod:`convert.build.network`, :mod:`convert.build.layers`), with ``ct.convert`` as the fallback
(:mod:`convert.build.ct_convert`); :mod:`convert.build.run` is the entry point.
"""
