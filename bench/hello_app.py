"""The server's ceiling: a Bottle app that answers lite's routes with a constant.

Same routes as lite, same Apache and mod_wsgi configuration, no database. It
reads the `counter` parameter as lite does (from the query, or the form body
of a POST), so that both apps make the server deliver and parse the same
request: the difference between them is then lite's own work.
"""

import bottle

application = bottle.Bottle()


@application.get("/lite/get")
def get_counter() -> dict:
    return {"counter": bottle.request.query.get("counter", "hits"), "value": 0}


@application.post("/lite/inc")
def increment() -> dict:
    return {"counter": bottle.request.forms.get("counter", "hits"), "value": 1}
