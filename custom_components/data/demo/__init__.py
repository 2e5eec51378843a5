"""Demo data: procedural torso phantoms and the real example CT, so every stage trains and is tested on a CPU.

Modules, by concern (each imports only the ones above it):

* :mod:`.labels` -- the phantom's label space (TotalSegmentator v1), the organs a tumor may be drawn in, tissue HU;
* :mod:`.records` -- clinical records for phantom cases;
* :mod:`.geometry` -- the grid in reference mm, the canvas being painted, smooth noise fields, shape primitives;
* :mod:`.patient` -- one patient's proportions (body outline, spine, diaphragm) and the painters' shared context;
* :mod:`.organs` -- the painters of the body wall, the organs and the bones, and the final CT (scanner noise, int16);
* :mod:`.tumors` -- a record's tumor fields, and tumors placed inside their organ;
* :mod:`.phantom` -- :func:`~.phantom.generate_phantom`: record -> paired CT, labels and tumor mask;
* :mod:`.example` -- the real example CT shipped with the package, and the slab of it held out as the test case;
* :mod:`.dataset` -- ``guidegen demo-data``: phantoms and the example CT written as raw data and prepared.
"""
