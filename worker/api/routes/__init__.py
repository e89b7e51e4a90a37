"""Route groups of the review service: listings, files, flags, admin, pages."""
