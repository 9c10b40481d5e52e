"""Networks: the backbone families (a registry), the projection head, and the ReSSL
model (student, EMA teacher, queue)."""
