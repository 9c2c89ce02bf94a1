"""Routing: which node serves a client.

``rule`` is the routing rule, pure functions over plain data; ``ranking`` orders the nodes a
client's location allows, nearest first, once per location; ``router`` locates the client and
applies the rule to the live node state, with the rankings cached in front of it.
"""
