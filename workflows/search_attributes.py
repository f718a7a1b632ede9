"""Search attributes every order workflow keeps current, so operators can find orders in the UI."""

from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes

ORDER_STATUS = SearchAttributeKey.for_keyword("OrderStatus")
ORDER_KIND = SearchAttributeKey.for_keyword("OrderKind")
CHECKOUT_SESSION_ID = SearchAttributeKey.for_keyword("CheckoutSessionId")

ALL = (ORDER_STATUS, ORDER_KIND, CHECKOUT_SESSION_ID)


def order_attributes(status: str, kind: str) -> TypedSearchAttributes:
    # OrderKind at start tells the workflow the namespace knows the order attributes.
    return TypedSearchAttributes(
        [SearchAttributePair(ORDER_KIND, kind), SearchAttributePair(ORDER_STATUS, status)]
    )
