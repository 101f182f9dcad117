"""The server's ceiling: a Bottle app whose routes return a constant.

Same routes as lite, same Apache and mod_wsgi configuration; no database.
"""

import bottle

application = bottle.Bottle()


@application.get("/lite/get")
def get_counter() -> dict:
    return {"counter": "hits", "value": 0}


@application.post("/lite/inc")
def increment() -> dict:
    return {"counter": "hits", "value": 1}
