"""Private implementation of tracking: objects in a (T, Y, X) label movie linked over time.

- ``graph``: the tracking graph (one node per object and frame, edges to successors) and its conversion into
  micro_sam's result: a label movie coloured by track id plus a list of lineages ``{track: [children]}``.
- ``linker``: the weight-free overlap linker (:class:`OverlapLinker`): optimal frame-to-frame assignment,
  divisions and gap closing.
- ``backends``: choice between trackastra (pretrained model name or local model folder) and the overlap
  linker, with the fallback when trackastra or its weights are not available.
- ``ctc``: writing results in the Cell Tracking Challenge format.
- ``interactive``: following one object through the frames with SAM (the tracking annotator's step).

The public names are exported by :mod:`micro_sam.multi_dimensional_segmentation`. Only numpy / scipy are imported
here at module level; torch, segment_anything and trackastra are imported when used.
"""
