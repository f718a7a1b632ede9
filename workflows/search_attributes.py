"""Search attributes every order workflow keeps current, so operators can find orders in the UI."""

from temporalio.common import SearchAttributeKey

ORDER_STATUS = SearchAttributeKey.for_keyword("OrderStatus")
ORDER_KIND = SearchAttributeKey.for_keyword("OrderKind")
CHECKOUT_SESSION_ID = SearchAttributeKey.for_keyword("CheckoutSessionId")

ALL = (ORDER_STATUS, ORDER_KIND, CHECKOUT_SESSION_ID)
