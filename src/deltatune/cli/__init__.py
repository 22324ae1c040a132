"""deltatune."""
