"""mbtrain sweep: paired, honest comparisons of balancing methods over seeds."""
