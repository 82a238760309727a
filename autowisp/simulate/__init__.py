"""Synthetic DSLR nights with ground truth, for tests, the demo and benchmarks.

- :mod:`autowisp.simulate.night`: :class:`~autowisp.simulate.night.NightConfig` and
  :func:`~autowisp.simulate.night.simulate_night`, which writes raw frames and truth;
- :mod:`autowisp.simulate.camera`: a camera (:class:`~autowisp.simulate.camera.CameraSpec`,
  :func:`~autowisp.simulate.camera.make_detector`) exposing a
  :class:`~autowisp.simulate.camera.Scene`, with the theoretical aperture noise;
- :mod:`autowisp.simulate.sky`, :mod:`autowisp.simulate.observing`: stars, airmass,
  extinction, scintillation, clouds, PSF and variables;
- :mod:`autowisp.simulate.render`: the PSF rendering kernel;
- :mod:`autowisp.simulate.truth`: ``truth.h5`` writer and reader.
"""
