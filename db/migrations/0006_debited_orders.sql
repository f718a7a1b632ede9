-- An order paid from the balance never ends failed or expired with the money kept: it ends
-- delivered or refunded (process_refund; refunded is final), or waits for an operator. A
-- debit whose answer was lost (the workflow then gives it back with process_refund) cannot
-- leave a failed order behind.

CREATE OR REPLACE FUNCTION shop_internal.keep_debited_orders()
RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status IN ('failed', 'expired') AND NEW.status IS DISTINCT FROM OLD.status
       AND EXISTS (SELECT 1 FROM public.balance_transactions
                   WHERE idempotency_key = 'order-payment:' || NEW.order_id) THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'wrong_state',
            DETAIL = format('The order was paid from the balance and cannot become %s; '
                            'refund it instead.', NEW.status);
    END IF;
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS orders_keep_debited ON orders;
CREATE TRIGGER orders_keep_debited BEFORE UPDATE OF status ON orders
    FOR EACH ROW EXECUTE FUNCTION shop_internal.keep_debited_orders();

CALL shop_internal.service_role_only(ARRAY['FUNCTION shop_internal.keep_debited_orders()']);
