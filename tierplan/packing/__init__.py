"""Static offsets in an arena: buffers that are not live together share bytes.

``buffers`` holds the data types, ``pack`` the greedy and exact packers and the lower bound,
``exact`` and ``skyline`` the complete search. An op order that lowers the peak the packer has to
meet is ``tierplan.passes.ordering``'s.
"""
