"""A1111's X/Y/Z plot and prompt matrix: many requests, one labelled grid."""
