-- The digital goods shop: catalogue, per-unit stock, orders, the balance ledger, and the SQL
-- functions that are the only place where stock and money change. Activities call the
-- functions in `public` over asyncpg or Supabase's REST API (rpc); one call is one transaction.
--
-- Conventions
-- * Money is bigint minor units plus a lowercase ISO currency; Stars are whole XTR.
-- * Every public function takes `p_` parameters and returns jsonb (stars_for_amount: integer).
-- * A refusal is RAISE ... ERRCODE 'P0001' with MESSAGE = a stable code and DETAIL = a sentence
--   for a person. Codes: product_not_found, product_unavailable, invalid_quantity,
--   invalid_amount, invalid_payment_method, out_of_stock, insufficient_balance,
--   too_many_unpaid_orders, order_not_found, wrong_state, reservation_lost, deadline_passed,
--   already_fulfilled, idempotency_conflict, supplier_not_found, not_paid, and two more:
--   invalid_argument (a malformed input the codes above do not name; DETAIL says which) and
--   submission_not_found (fulfill_prepaid_order with a submission of another order).
-- * Locks are always taken in the order: order row, user row, stock rows. Stock is claimed
--   with FOR UPDATE SKIP LOCKED, so buyers never queue behind one another's units.
-- * A user's balance changes only in shop_internal.ledger, under the user's row lock, together
--   with its balance_transactions row: balance = sum(amount) of the user's transactions.
-- * Helpers live in schema shop_internal, which PostgREST does not expose.

CREATE EXTENSION IF NOT EXISTS vector;
CREATE SCHEMA IF NOT EXISTS shop_internal;

-- --- Tables ------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS users (
    telegram_id bigint      PRIMARY KEY,
    username    text,
    first_name  text,
    balance     bigint      NOT NULL DEFAULT 0 CHECK (balance >= 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS suppliers (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name             text        NOT NULL,
    telegram_chat_id bigint      NOT NULL,
    -- sha256 hex of the supplier's token; the token itself is never stored.
    token_hash       text        NOT NULL UNIQUE,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS products (
    id                     bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name                   text        NOT NULL,
    description            text        NOT NULL DEFAULT '',
    price                  bigint      NOT NULL CHECK (price > 0),
    currency               text        NOT NULL,
    status                 text        NOT NULL DEFAULT 'active'
                                       CHECK (status IN ('active', 'inactive')),
    made_to_order          boolean     NOT NULL DEFAULT false,
    fulfillment_time_hours numeric     NOT NULL DEFAULT 48 CHECK (fulfillment_time_hours > 0),
    supplier_id            bigint      REFERENCES suppliers (id),
    embedding              vector(384),
    embedding_model        text,
    embedded_text_hash     text,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS products_supplier_idx ON products (supplier_id);

-- One row per unit for sale. A unit is 'reserved' by one order until reserved_until; a lapsed
-- reservation counts as available (the view, the claim) even if nothing released it.
CREATE TABLE IF NOT EXISTS stock_items (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    product_id       bigint      NOT NULL REFERENCES products (id),
    content          text        NOT NULL,
    status           text        NOT NULL DEFAULT 'available'
                                 CHECK (status IN ('available', 'reserved', 'sold')),
    reserved_until   timestamptz,
    -- No foreign key: reserve_product_for_purchase may run before the order row exists.
    order_id         uuid,
    discount_percent integer     NOT NULL DEFAULT 0 CHECK (discount_percent BETWEEN 0 AND 90),
    created_at       timestamptz NOT NULL DEFAULT now(),
    sold_at          timestamptz
);
-- Claiming walks a product's free units in the order they sell (highest discount first)
-- without touching the reserved and sold ones; lapsed reservations have an index of their own.
CREATE INDEX IF NOT EXISTS stock_items_available_idx
    ON stock_items (product_id, discount_percent DESC, id) WHERE status = 'available';
CREATE INDEX IF NOT EXISTS stock_items_reserved_idx
    ON stock_items (product_id, reserved_until) WHERE status = 'reserved';
CREATE INDEX IF NOT EXISTS stock_items_order_idx ON stock_items (order_id)
    WHERE order_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS orders (
    order_id             uuid        PRIMARY KEY,
    telegram_id          bigint      NOT NULL REFERENCES users (telegram_id),
    product_id           bigint      NOT NULL REFERENCES products (id),
    quantity             integer     NOT NULL CHECK (quantity > 0),
    amount               bigint      NOT NULL CHECK (amount > 0),
    currency             text        NOT NULL,
    amount_stars         integer     NOT NULL CHECK (amount_stars > 0),
    status               text        NOT NULL DEFAULT 'awaiting_payment' CHECK (status IN (
                             'awaiting_payment', 'awaiting_supplier', 'delivered', 'expired',
                             'refunded', 'failed', 'needs_attention')),
    order_type           text        NOT NULL CHECK (order_type IN ('instant', 'prepaid')),
    -- 'choice': an offer whose buyer picks the way to pay on one of its buttons.
    payment_method       text        NOT NULL
                                     CHECK (payment_method IN ('stars', 'stripe', 'balance',
                                                               'choice')),
    payment_reference    text,
    paid_at              timestamptz,
    reserved_until       timestamptz,
    fulfillment_deadline timestamptz,
    delivered_at         timestamptz,
    telegram_delivery    text        CHECK (telegram_delivery IN ('sent', 'blocked')),
    refund_method        text,
    refund_reference     text,
    refund_amount        bigint,
    refund_reason        text,
    refunded_at          timestamptz,
    failure_reason       text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS orders_user_idx ON orders (telegram_id, created_at DESC);
CREATE INDEX IF NOT EXISTS orders_status_idx ON orders (status, created_at DESC);
CREATE INDEX IF NOT EXISTS orders_product_idx ON orders (product_id);

-- A supplier's submissions for a prepaid order, staged until the workflow accepts one.
CREATE TABLE IF NOT EXISTS order_fulfilments (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id     uuid        NOT NULL REFERENCES orders (order_id),
    supplier_id  bigint      NOT NULL REFERENCES suppliers (id),
    content      text        NOT NULL,
    submitted_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS order_fulfilments_order_idx ON order_fulfilments (order_id);

CREATE TABLE IF NOT EXISTS balance_transactions (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    telegram_id     bigint      NOT NULL REFERENCES users (telegram_id),
    amount          bigint      NOT NULL CHECK (amount <> 0),
    reason          text        NOT NULL,
    idempotency_key text        NOT NULL UNIQUE,
    order_id        uuid        REFERENCES orders (order_id),
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS balance_transactions_user_idx ON balance_transactions (telegram_id);

-- Each Telegram update acts once, however often Telegram redelivers it.
CREATE TABLE IF NOT EXISTS telegram_updates (
    update_id   bigint      PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION shop_internal.touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS orders_touch ON orders;
CREATE TRIGGER orders_touch BEFORE UPDATE ON orders
    FOR EACH ROW EXECUTE FUNCTION shop_internal.touch_updated_at();
DROP TRIGGER IF EXISTS products_touch ON products;
CREATE TRIGGER products_touch BEFORE UPDATE ON products
    FOR EACH ROW EXECUTE FUNCTION shop_internal.touch_updated_at();

-- --- Prices ------------------------------------------------------------------------------

-- One unit's price after its discount, rounded half up; never below one minor unit, so no
-- order is ever free or unpayable.
CREATE OR REPLACE FUNCTION shop_internal.unit_price(p_price bigint, p_discount_percent integer)
RETURNS bigint LANGUAGE sql IMMUTABLE AS $$
    SELECT greatest(1, (p_price * (100 - p_discount_percent) + 50) / 100)
$$;

-- Stars for an amount of minor units at p_stars_per_unit Stars per 1.00: rounded up, at least 1.
CREATE OR REPLACE FUNCTION stars_for_amount(p_amount bigint, p_stars_per_unit numeric)
RETURNS integer LANGUAGE sql IMMUTABLE AS $$
    SELECT greatest(1, ceil(p_amount * p_stars_per_unit / 100))::integer
$$;

-- One row per product, whatever its status. `available` counts units a buyer could claim now;
-- units are claimed highest discount first, so discount_percent and final_price are what the
-- next buyer of one unit pays.
CREATE OR REPLACE VIEW available_stock_with_discounts AS
SELECT
    p.id AS product_id,
    p.name,
    p.description,
    p.price,
    p.currency,
    p.status,
    p.made_to_order,
    p.fulfillment_time_hours,
    p.supplier_id,
    coalesce(s.available, 0)::integer AS available,
    coalesce(s.discount_percent, 0)::integer AS discount_percent,
    shop_internal.unit_price(p.price, coalesce(s.discount_percent, 0)) AS final_price
FROM products p
LEFT JOIN LATERAL (
    SELECT count(*) AS available, max(si.discount_percent) AS discount_percent
    FROM stock_items si
    WHERE si.product_id = p.id
      AND (si.status = 'available' OR (si.status = 'reserved' AND si.reserved_until < now()))
) s ON true;

-- --- Internal helpers --------------------------------------------------------------------

-- The order object every function returns (see get_order).
CREATE OR REPLACE FUNCTION shop_internal.order_json(o public.orders)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'order_id', o.order_id,
        'order_type', o.order_type,
        'status', o.status,
        'product_id', o.product_id,
        'product_name', p.name,
        'quantity', o.quantity,
        'amount', o.amount,
        'currency', o.currency,
        'amount_stars', o.amount_stars,
        'payment_method', o.payment_method,
        'payment_reference', o.payment_reference,
        'reserved_until', o.reserved_until,
        'fulfillment_deadline', o.fulfillment_deadline,
        'telegram_id', o.telegram_id,
        'supplier_id', p.supplier_id,
        -- Where the supplier is told of a paid order (null for stock sold from the shelf).
        'supplier_chat_id', (SELECT s.telegram_chat_id FROM public.suppliers s
                             WHERE s.id = p.supplier_id),
        'telegram_delivery', o.telegram_delivery,
        'refund_method', o.refund_method,
        'refund_amount', o.refund_amount,
        'refund_reason', o.refund_reason,
        'refunded_at', o.refunded_at,
        'failure_reason', o.failure_reason,
        'paid_at', o.paid_at,
        'delivered_at', o.delivered_at,
        'created_at', o.created_at,
        'updated_at', o.updated_at
    )
    FROM public.products p
    WHERE p.id = o.product_id
$$;

-- The order under its row lock, which serialises every change of its state.
CREATE OR REPLACE FUNCTION shop_internal.lock_order(p_order_id uuid)
RETURNS public.orders LANGUAGE plpgsql AS $$
DECLARE
    v_order public.orders;
BEGIN
    SELECT * INTO v_order FROM public.orders WHERE order_id = p_order_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'order_not_found',
            DETAIL = format('There is no order %s.', p_order_id);
    END IF;
    RETURN v_order;
END $$;

-- Units still reserved (not sold) by the order go back on sale. Returns how many.
CREATE OR REPLACE FUNCTION shop_internal.release_units(p_order_id uuid)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
BEGIN
    UPDATE public.stock_items
    SET status = 'available', order_id = NULL, reserved_until = NULL
    WHERE order_id = p_order_id AND status = 'reserved';
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END $$;

-- Reserves p_quantity units of the product for the order until now() + p_ttl_seconds, all or
-- nothing: {units, amount, reserved_until}, or NULL (nothing changed) when too few are free.
-- Units the order already holds count first (a retry extends them); further units are
-- claimed highest discount first, skipping units other transactions hold locked.
CREATE OR REPLACE FUNCTION shop_internal.claim_units(
    p_order_id uuid, p_product_id bigint, p_quantity integer, p_ttl_seconds integer)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_held   bigint[];
    v_new    bigint[] := '{}';
    v_more   bigint[];
    v_units  bigint[];
    v_until  timestamptz := now() + make_interval(secs => p_ttl_seconds);
    v_amount bigint;
BEGIN
    SELECT coalesce(array_agg(id ORDER BY discount_percent DESC, id), '{}') INTO v_held
    FROM (
        SELECT id, discount_percent FROM public.stock_items
        WHERE order_id = p_order_id AND status = 'reserved' AND product_id = p_product_id
        FOR UPDATE
    ) held;

    IF cardinality(v_held) < p_quantity THEN
        -- Each claim is one statement that locks and takes its units, so a row is locked
        -- only for the rest of this short transaction: free units first (one index range),
        -- then units whose reservation lapsed without a release (they count as available).
        WITH picked AS (
            SELECT id FROM public.stock_items
            WHERE product_id = p_product_id AND status = 'available'
            ORDER BY discount_percent DESC, id
            LIMIT p_quantity - cardinality(v_held)
            FOR UPDATE SKIP LOCKED
        ), taken AS (
            UPDATE public.stock_items s
            SET status = 'reserved', order_id = p_order_id, reserved_until = v_until
            FROM picked WHERE s.id = picked.id
            RETURNING s.id
        )
        SELECT coalesce(array_agg(id), '{}') INTO v_new FROM taken;
        IF cardinality(v_held) + cardinality(v_new) < p_quantity THEN
            WITH picked AS (
                SELECT id FROM public.stock_items
                WHERE product_id = p_product_id AND status = 'reserved'
                  AND reserved_until < now()
                  -- Our own rows are locked by us, so SKIP LOCKED would not skip them.
                  AND order_id IS DISTINCT FROM p_order_id
                ORDER BY discount_percent DESC, id
                LIMIT p_quantity - cardinality(v_held) - cardinality(v_new)
                FOR UPDATE SKIP LOCKED
            ), taken AS (
                UPDATE public.stock_items s
                SET order_id = p_order_id, reserved_until = v_until
                FROM picked WHERE s.id = picked.id
                RETURNING s.id
            )
            SELECT coalesce(array_agg(id), '{}') INTO v_more FROM taken;
            v_new := v_new || v_more;
        END IF;
        IF cardinality(v_held) + cardinality(v_new) < p_quantity THEN
            -- All or nothing: what this call took goes back (a lapsed unit comes back as
            -- available, which it already counted as).
            UPDATE public.stock_items
            SET status = 'available', order_id = NULL, reserved_until = NULL
            WHERE id = ANY (v_new);
            RETURN NULL;
        END IF;
        v_units := v_held || v_new;
        IF cardinality(v_held) > 0 THEN
            UPDATE public.stock_items SET reserved_until = v_until WHERE id = ANY (v_held);
        END IF;
    ELSE
        -- A retry with a smaller quantity: the surplus goes back on sale.
        UPDATE public.stock_items
        SET status = 'available', order_id = NULL, reserved_until = NULL
        WHERE id = ANY (v_held[p_quantity + 1:]);
        v_units := v_held[1:p_quantity];
        UPDATE public.stock_items SET reserved_until = v_until WHERE id = ANY (v_units);
    END IF;

    SELECT sum(shop_internal.unit_price(p.price, si.discount_percent)) INTO v_amount
    FROM public.stock_items si JOIN public.products p ON p.id = si.product_id
    WHERE si.id = ANY (v_units);

    RETURN jsonb_build_object('units', p_quantity, 'amount', v_amount, 'reserved_until', v_until);
END $$;

-- The one writer of balances: appends a transaction and moves the balance with it, under the
-- user's row lock. Same key again -> {applied: false} with the current balance.
CREATE OR REPLACE FUNCTION shop_internal.ledger(
    p_telegram_id bigint, p_amount bigint, p_reason text, p_idempotency_key text,
    p_order_id uuid)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_balance bigint;
    v_tx      public.balance_transactions;
    v_id      bigint;
BEGIN
    IF p_amount IS NULL OR p_amount = 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_amount',
            DETAIL = 'A balance change needs a non-zero amount.';
    END IF;
    IF p_idempotency_key IS NULL OR btrim(p_idempotency_key) = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_argument',
            DETAIL = 'A balance change needs an idempotency key.';
    END IF;

    INSERT INTO public.users (telegram_id) VALUES (p_telegram_id)
    ON CONFLICT (telegram_id) DO NOTHING;
    SELECT balance INTO v_balance FROM public.users
    WHERE telegram_id = p_telegram_id FOR UPDATE;

    SELECT * INTO v_tx FROM public.balance_transactions WHERE idempotency_key = p_idempotency_key;
    IF FOUND THEN
        IF v_tx.telegram_id <> p_telegram_id OR v_tx.amount <> p_amount THEN
            RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'idempotency_conflict',
                DETAIL = format('Key %s was already used for another balance change.',
                                p_idempotency_key);
        END IF;
        RETURN jsonb_build_object('balance', v_balance, 'applied', false,
                                  'transaction_id', v_tx.id);
    END IF;

    IF v_balance + p_amount < 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'insufficient_balance',
            DETAIL = format('The balance is %s, %s is needed.', v_balance, -p_amount);
    END IF;

    INSERT INTO public.balance_transactions (telegram_id, amount, reason, idempotency_key, order_id)
    VALUES (p_telegram_id, p_amount, coalesce(p_reason, ''), p_idempotency_key, p_order_id)
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING id INTO v_id;
    IF v_id IS NULL THEN
        -- Another user's change took this key between our look and our insert.
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'idempotency_conflict',
            DETAIL = format('Key %s was already used for another balance change.',
                            p_idempotency_key);
    END IF;

    UPDATE public.users SET balance = balance + p_amount
    WHERE telegram_id = p_telegram_id
    RETURNING balance INTO v_balance;
    RETURN jsonb_build_object('balance', v_balance, 'applied', true, 'transaction_id', v_id);
END $$;

-- --- Catalogue ---------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION shop_catalog(p_stars_per_unit numeric)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
        'id', v.product_id,
        'name', v.name,
        'description', v.description,
        'price', v.price,
        'final_price', v.final_price,
        'discount_percent', v.discount_percent,
        'currency', v.currency,
        'price_stars', stars_for_amount(v.final_price, p_stars_per_unit),
        'available', v.available,
        'made_to_order', v.made_to_order,
        'fulfillment_time_hours', v.fulfillment_time_hours
    ) ORDER BY v.product_id), '[]'::jsonb)
    FROM available_stock_with_discounts v
    WHERE v.status = 'active'
$$;

-- --- Reservations ------------------------------------------------------------------------

-- Does not check the product's status: a late payment may still take a unit of a product
-- withdrawn since the order was made. Does not change orders.amount: the caller compares
-- the returned amount with what was paid.
CREATE OR REPLACE FUNCTION reserve_product_for_purchase(
    p_order_id uuid, p_product_id bigint, p_quantity integer, p_ttl_seconds integer)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_order public.orders;
    v_claim jsonb;
BEGIN
    IF p_quantity IS NULL OR p_quantity < 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_quantity',
            DETAIL = 'The quantity must be at least 1.';
    END IF;
    IF p_ttl_seconds IS NULL OR p_ttl_seconds < 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_argument',
            DETAIL = 'A reservation must last at least one second.';
    END IF;
    SELECT * INTO v_order FROM orders WHERE order_id = p_order_id FOR UPDATE;
    IF FOUND THEN
        IF v_order.order_type <> 'instant'
           OR v_order.status NOT IN ('awaiting_payment', 'expired', 'needs_attention') THEN
            RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'wrong_state',
                DETAIL = format('The %s order is %s; only unpaid instant orders reserve units.',
                                v_order.order_type, v_order.status);
        END IF;
        IF v_order.product_id <> p_product_id THEN
            RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_argument',
                DETAIL = format('The order is for product %s, not %s.',
                                v_order.product_id, p_product_id);
        END IF;
    END IF;
    PERFORM 1 FROM products WHERE id = p_product_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'product_not_found',
            DETAIL = format('There is no product %s.', p_product_id);
    END IF;

    v_claim := shop_internal.claim_units(p_order_id, p_product_id, p_quantity, p_ttl_seconds);
    IF v_claim IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'out_of_stock',
            DETAIL = format('Fewer than %s units of product %s are available.',
                            p_quantity, p_product_id);
    END IF;
    IF v_order.order_id IS NOT NULL THEN
        UPDATE orders SET reserved_until = (v_claim ->> 'reserved_until')::timestamptz
        WHERE order_id = p_order_id;
    END IF;
    RETURN jsonb_build_object('order_id', p_order_id) || v_claim;
END $$;

CREATE OR REPLACE FUNCTION release_reservation(p_order_id uuid)
RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
    RETURN jsonb_build_object('released', shop_internal.release_units(p_order_id));
END $$;

-- --- Orders ------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION get_order(p_order_id uuid)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT shop_internal.order_json(o) FROM orders o WHERE o.order_id = p_order_id
$$;

CREATE OR REPLACE FUNCTION create_order_with_availability_check(
    p_order_id uuid, p_telegram_id bigint, p_product_id bigint, p_quantity integer,
    p_payment_method text, p_ttl_seconds integer, p_stars_per_unit numeric,
    p_max_unpaid integer, p_max_quantity integer)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_existing jsonb;
    v_product  products;
    v_balance  bigint;
    v_unpaid   integer;
    v_claim    jsonb;
    v_type     text;
    v_amount   bigint;
    v_until    timestamptz;
    v_deadline timestamptz;
BEGIN
    -- A retried activity gets the order it created, whatever has changed since.
    v_existing := get_order(p_order_id);
    IF v_existing IS NOT NULL THEN
        RETURN v_existing;
    END IF;

    IF p_payment_method IS NULL
       OR p_payment_method NOT IN ('stars', 'stripe', 'balance', 'choice') THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_payment_method',
            DETAIL = format('%s is not a payment method (stars, stripe, balance or choice).',
                            coalesce(p_payment_method, 'null'));
    END IF;
    IF p_quantity IS NULL OR p_quantity < 1 OR p_quantity > coalesce(p_max_quantity, p_quantity)
    THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_quantity',
            DETAIL = format('The quantity must be between 1 and %s.', p_max_quantity);
    END IF;
    IF p_ttl_seconds IS NULL OR p_ttl_seconds < 1 OR p_stars_per_unit IS NULL
       OR p_stars_per_unit <= 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_argument',
            DETAIL = 'The reservation time and the Stars rate must be positive.';
    END IF;
    SELECT * INTO v_product FROM products WHERE id = p_product_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'product_not_found',
            DETAIL = format('There is no product %s.', p_product_id);
    END IF;
    IF v_product.status <> 'active' THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'product_unavailable',
            DETAIL = format('%s is not on sale.', v_product.name);
    END IF;

    -- The user's row lock serialises this user's order creations, so the unpaid-order limit
    -- and the balance check hold however many requests arrive at once.
    INSERT INTO users (telegram_id) VALUES (p_telegram_id) ON CONFLICT (telegram_id) DO NOTHING;
    SELECT balance INTO v_balance FROM users WHERE telegram_id = p_telegram_id FOR UPDATE;
    v_existing := get_order(p_order_id);
    IF v_existing IS NOT NULL THEN
        RETURN v_existing;  -- a concurrent retry created it while we waited for the lock
    END IF;
    SELECT count(*) INTO v_unpaid FROM orders
    WHERE telegram_id = p_telegram_id AND status = 'awaiting_payment';
    IF v_unpaid >= coalesce(p_max_unpaid, v_unpaid + 1) THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'too_many_unpaid_orders',
            DETAIL = format('You already have %s unpaid orders; pay or wait for one to expire.',
                            v_unpaid);
    END IF;

    v_claim := shop_internal.claim_units(p_order_id, p_product_id, p_quantity, p_ttl_seconds);
    IF v_claim IS NOT NULL THEN
        v_type := 'instant';
        v_amount := (v_claim ->> 'amount')::bigint;
        v_until := (v_claim ->> 'reserved_until')::timestamptz;
    ELSIF v_product.made_to_order THEN
        v_type := 'prepaid';
        v_amount := v_product.price * p_quantity;
        -- Provisional: process_prepaid_payment starts the supplier's time again at payment.
        v_deadline := now()
            + make_interval(secs => (v_product.fulfillment_time_hours * 3600)::double precision);
    ELSE
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'out_of_stock',
            DETAIL = format('Fewer than %s units of %s are available.',
                            p_quantity, v_product.name);
    END IF;

    IF p_payment_method = 'balance' AND v_balance < v_amount THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'insufficient_balance',
            DETAIL = format('The balance is %s, the order costs %s.', v_balance, v_amount);
    END IF;

    INSERT INTO orders (order_id, telegram_id, product_id, quantity, amount, currency,
                        amount_stars, order_type, payment_method, reserved_until,
                        fulfillment_deadline)
    VALUES (p_order_id, p_telegram_id, p_product_id, p_quantity, v_amount, v_product.currency,
            stars_for_amount(v_amount, p_stars_per_unit), v_type, p_payment_method, v_until,
            v_deadline);
    RETURN get_order(p_order_id);
END $$;

-- Counts a debit already made for the order (same key) as done, whatever the order's state.
CREATE OR REPLACE FUNCTION pay_order_from_balance(p_order_id uuid)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_order  orders;
    v_tx     balance_transactions;
    v_result jsonb;
BEGIN
    v_order := shop_internal.lock_order(p_order_id);
    SELECT * INTO v_tx FROM balance_transactions
    WHERE idempotency_key = 'order-payment:' || p_order_id;
    IF FOUND THEN
        RETURN jsonb_build_object(
            'balance', (SELECT balance FROM users WHERE telegram_id = v_tx.telegram_id),
            'transaction_id', v_tx.id);
    END IF;
    IF v_order.status NOT IN ('awaiting_payment', 'expired') THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'wrong_state',
            DETAIL = format('The order is %s; only an unpaid order can be paid.', v_order.status);
    END IF;
    v_result := shop_internal.ledger(v_order.telegram_id, -v_order.amount, 'order_payment',
                                     'order-payment:' || p_order_id, p_order_id);
    RETURN jsonb_build_object('balance', v_result -> 'balance',
                              'transaction_id', v_result -> 'transaction_id');
END $$;

-- Also from needs_attention, so an operator can complete an order held for review.
CREATE OR REPLACE FUNCTION complete_purchase(
    p_order_id uuid, p_payment_method text, p_payment_reference text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_order orders;
    v_units bigint[];
BEGIN
    v_order := shop_internal.lock_order(p_order_id);
    IF v_order.status <> 'delivered' THEN
        IF p_payment_method IS NULL OR p_payment_method NOT IN ('stars', 'stripe', 'balance') THEN
            RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_payment_method',
                DETAIL = format('%s is not a payment method (stars, stripe or balance).',
                                coalesce(p_payment_method, 'null'));
        END IF;
        IF v_order.order_type <> 'instant'
           OR v_order.status NOT IN ('awaiting_payment', 'expired', 'needs_attention') THEN
            RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'wrong_state',
                DETAIL = format('The %s order is %s and cannot be completed.',
                                v_order.order_type, v_order.status);
        END IF;
        SELECT coalesce(array_agg(id ORDER BY id), '{}') INTO v_units
        FROM (
            SELECT id FROM stock_items
            WHERE order_id = p_order_id AND status = 'reserved'
            FOR UPDATE
        ) held;
        IF cardinality(v_units) < v_order.quantity THEN
            RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'reservation_lost',
                DETAIL = format('The order holds %s of its %s units.',
                                cardinality(v_units), v_order.quantity);
        END IF;
        UPDATE stock_items SET status = 'available', order_id = NULL, reserved_until = NULL
        WHERE id = ANY (v_units[v_order.quantity + 1:]);
        UPDATE stock_items SET status = 'sold', sold_at = now(), reserved_until = NULL
        WHERE id = ANY (v_units[1:v_order.quantity]);
        UPDATE orders
        SET status = 'delivered', paid_at = coalesce(paid_at, now()), delivered_at = now(),
            payment_method = p_payment_method, payment_reference = p_payment_reference
        WHERE order_id = p_order_id;
    END IF;
    RETURN jsonb_build_object(
        'order', get_order(p_order_id),
        'content', coalesce((SELECT jsonb_agg(content ORDER BY id) FROM stock_items
                             WHERE order_id = p_order_id AND status = 'sold'), '[]'::jsonb));
END $$;

-- A second, different payment for an order already paid is wrong_state: the caller refunds it.
CREATE OR REPLACE FUNCTION process_prepaid_payment(
    p_order_id uuid, p_payment_method text, p_payment_reference text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_order orders;
    v_hours numeric;
BEGIN
    IF p_payment_method IS NULL OR p_payment_method NOT IN ('stars', 'stripe', 'balance') THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_payment_method',
            DETAIL = format('%s is not a payment method (stars, stripe or balance).',
                            coalesce(p_payment_method, 'null'));
    END IF;
    v_order := shop_internal.lock_order(p_order_id);
    IF v_order.order_type <> 'prepaid' THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'wrong_state',
            DETAIL = 'The order is not made to order.';
    END IF;
    IF v_order.status IN ('awaiting_supplier', 'delivered')
       AND v_order.payment_reference IS NOT DISTINCT FROM p_payment_reference THEN
        RETURN get_order(p_order_id);
    END IF;
    IF v_order.status NOT IN ('awaiting_payment', 'expired') THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'wrong_state',
            DETAIL = format('The order is %s and takes no payment.', v_order.status);
    END IF;
    SELECT fulfillment_time_hours INTO v_hours FROM products WHERE id = v_order.product_id;
    UPDATE orders
    SET status = 'awaiting_supplier', paid_at = now(), payment_method = p_payment_method,
        payment_reference = p_payment_reference,
        fulfillment_deadline = now() + make_interval(secs => (v_hours * 3600)::double precision)
    WHERE order_id = p_order_id;
    RETURN get_order(p_order_id);
END $$;

CREATE OR REPLACE FUNCTION submit_fulfilment(
    p_order_id uuid, p_supplier_id bigint, p_content text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_order orders;
    v_id    bigint;
BEGIN
    IF p_content IS NULL OR btrim(p_content) = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_argument',
            DETAIL = 'The fulfilment is empty.';
    END IF;
    -- Another supplier's order is reported as missing: suppliers learn nothing of others.
    SELECT o.* INTO v_order
    FROM orders o JOIN products p ON p.id = o.product_id
    WHERE o.order_id = p_order_id AND p.supplier_id = p_supplier_id
    FOR UPDATE OF o;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'order_not_found',
            DETAIL = format('There is no order %s for this supplier.', p_order_id);
    END IF;
    IF v_order.status = 'delivered' THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'already_fulfilled',
            DETAIL = 'The order has already been delivered.';
    END IF;
    IF v_order.status <> 'awaiting_supplier' THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'wrong_state',
            DETAIL = format('The order is %s, not waiting for its supplier.', v_order.status);
    END IF;
    IF now() > v_order.fulfillment_deadline THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'deadline_passed',
            DETAIL = format('The deadline was %s.', v_order.fulfillment_deadline);
    END IF;
    INSERT INTO order_fulfilments (order_id, supplier_id, content)
    VALUES (p_order_id, p_supplier_id, p_content)
    RETURNING id INTO v_id;
    RETURN jsonb_build_object('submission_id', v_id);
END $$;

-- The workflow is the arbiter of the deadline: this function does not check it.
CREATE OR REPLACE FUNCTION fulfill_prepaid_order(p_order_id uuid, p_submission_id bigint)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_order   orders;
    v_content text;
BEGIN
    v_order := shop_internal.lock_order(p_order_id);
    IF v_order.status = 'delivered' THEN
        RETURN get_order(p_order_id);
    END IF;
    IF v_order.status NOT IN ('awaiting_supplier', 'needs_attention')
       OR v_order.order_type <> 'prepaid' OR v_order.paid_at IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'wrong_state',
            DETAIL = format('The order is %s and cannot be fulfilled.', v_order.status);
    END IF;
    SELECT content INTO v_content FROM order_fulfilments
    WHERE id = p_submission_id AND order_id = p_order_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'submission_not_found',
            DETAIL = format('There is no submission %s for order %s.',
                            p_submission_id, p_order_id);
    END IF;
    INSERT INTO stock_items (product_id, content, status, order_id, sold_at)
    VALUES (v_order.product_id, v_content, 'sold', p_order_id, now());
    UPDATE orders SET status = 'delivered', delivered_at = now() WHERE order_id = p_order_id;
    RETURN get_order(p_order_id);
END $$;

CREATE OR REPLACE FUNCTION expire_order(p_order_id uuid)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_order orders;
BEGIN
    v_order := shop_internal.lock_order(p_order_id);
    IF v_order.status = 'expired' THEN
        RETURN get_order(p_order_id);
    END IF;
    IF v_order.status <> 'awaiting_payment' THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'wrong_state',
            DETAIL = format('The order is %s; only an unpaid order expires.', v_order.status);
    END IF;
    PERFORM shop_internal.release_units(p_order_id);
    UPDATE orders SET status = 'expired' WHERE order_id = p_order_id;
    RETURN get_order(p_order_id);
END $$;

-- Credits the order's amount to the balance once per order. An order refunded any other way
-- (record_external_refund) is not credited again. A paid order is refundable in any state,
-- delivered included (an operator's decision); an order never paid is refused.
CREATE OR REPLACE FUNCTION process_refund(p_order_id uuid, p_reason text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_order  orders;
    v_result jsonb;
BEGIN
    v_order := shop_internal.lock_order(p_order_id);
    IF v_order.status = 'refunded' THEN
        RETURN jsonb_build_object(
            'order', get_order(p_order_id), 'credited', false,
            'balance', (SELECT balance FROM users WHERE telegram_id = v_order.telegram_id));
    END IF;
    IF v_order.paid_at IS NULL AND v_order.payment_reference IS NULL AND NOT EXISTS (
        SELECT 1 FROM balance_transactions WHERE idempotency_key = 'order-payment:' || p_order_id
    ) THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'not_paid',
            DETAIL = 'The order was never paid; record the payment first.';
    END IF;
    v_result := shop_internal.ledger(v_order.telegram_id, v_order.amount, 'refund',
                                     'refund:' || p_order_id, p_order_id);
    PERFORM shop_internal.release_units(p_order_id);
    UPDATE orders
    SET status = 'refunded', refund_method = 'balance',
        refund_reference = (v_result ->> 'transaction_id'), refund_amount = v_order.amount,
        refund_reason = p_reason, refunded_at = now()
    WHERE order_id = p_order_id;
    RETURN jsonb_build_object('order', get_order(p_order_id), 'credited', true,
                              'balance', v_result -> 'balance');
END $$;

-- An order records one payment: another reference than the one stored is wrong_state.
CREATE OR REPLACE FUNCTION record_payment(
    p_order_id uuid, p_payment_method text, p_payment_reference text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_order orders;
BEGIN
    IF p_payment_method IS NULL OR p_payment_method NOT IN ('stars', 'stripe', 'balance') THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_payment_method',
            DETAIL = format('%s is not a payment method (stars, stripe or balance).',
                            coalesce(p_payment_method, 'null'));
    END IF;
    v_order := shop_internal.lock_order(p_order_id);
    IF v_order.payment_reference IS NOT DISTINCT FROM p_payment_reference
       AND v_order.paid_at IS NOT NULL THEN
        RETURN get_order(p_order_id);
    END IF;
    IF v_order.payment_reference IS NOT NULL OR v_order.status = 'refunded' THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'wrong_state',
            DETAIL = format('The %s order already records payment %s.',
                            v_order.status, coalesce(v_order.payment_reference, '(none)'));
    END IF;
    UPDATE orders
    SET paid_at = coalesce(paid_at, now()), payment_method = p_payment_method,
        payment_reference = p_payment_reference
    WHERE order_id = p_order_id;
    RETURN get_order(p_order_id);
END $$;

CREATE OR REPLACE FUNCTION record_external_refund(
    p_order_id uuid, p_method text, p_reference text, p_amount bigint, p_reason text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_order orders;
BEGIN
    IF p_method IS NULL OR p_method NOT IN ('stars', 'stripe') THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_payment_method',
            DETAIL = format('%s is not a refund method (stars or stripe).',
                            coalesce(p_method, 'null'));
    END IF;
    IF p_amount IS NULL OR p_amount <= 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_amount',
            DETAIL = 'A refund needs a positive amount.';
    END IF;
    v_order := shop_internal.lock_order(p_order_id);
    IF v_order.status = 'refunded' THEN
        RETURN get_order(p_order_id);
    END IF;
    PERFORM shop_internal.release_units(p_order_id);
    UPDATE orders
    SET status = 'refunded', refund_method = p_method, refund_reference = p_reference,
        refund_amount = p_amount, refund_reason = p_reason, refunded_at = now()
    WHERE order_id = p_order_id;
    RETURN get_order(p_order_id);
END $$;

-- Any status but delivered and refunded, which only their own functions set, and never out of
-- them. failed and expired release the order's reservation; p_reason goes to failure_reason.
CREATE OR REPLACE FUNCTION set_order_status(p_order_id uuid, p_status text, p_reason text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_order orders;
BEGIN
    IF p_status IS NULL OR p_status NOT IN (
        'awaiting_payment', 'awaiting_supplier', 'expired', 'failed', 'needs_attention') THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_argument',
            DETAIL = format('%s cannot be set directly.', coalesce(p_status, 'null'));
    END IF;
    v_order := shop_internal.lock_order(p_order_id);
    IF v_order.status IN ('delivered', 'refunded') AND v_order.status <> p_status THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'wrong_state',
            DETAIL = format('The order is %s, which is final.', v_order.status);
    END IF;
    IF p_status IN ('failed', 'expired') THEN
        PERFORM shop_internal.release_units(p_order_id);
    END IF;
    UPDATE orders SET status = p_status, failure_reason = coalesce(p_reason, failure_reason)
    WHERE order_id = p_order_id;
    RETURN get_order(p_order_id);
END $$;

CREATE OR REPLACE FUNCTION record_telegram_delivery(p_order_id uuid, p_outcome text)
RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
    IF p_outcome IS NULL OR p_outcome NOT IN ('sent', 'blocked') THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_argument',
            DETAIL = format('%s is not a delivery outcome (sent or blocked).',
                            coalesce(p_outcome, 'null'));
    END IF;
    PERFORM shop_internal.lock_order(p_order_id);
    UPDATE orders SET telegram_delivery = p_outcome WHERE order_id = p_order_id;
    RETURN get_order(p_order_id);
END $$;

CREATE OR REPLACE FUNCTION get_order_content(p_order_id uuid)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'order_id', o.order_id,
        'telegram_id', o.telegram_id,
        'product_name', p.name,
        'items', coalesce((SELECT jsonb_agg(si.content ORDER BY si.id) FROM stock_items si
                           WHERE si.order_id = o.order_id AND si.status = 'sold'), '[]'::jsonb))
    FROM orders o JOIN products p ON p.id = o.product_id
    WHERE o.order_id = p_order_id AND o.status = 'delivered'
$$;

-- --- Users and the ledger ----------------------------------------------------------------

CREATE OR REPLACE FUNCTION add_to_user_balance(
    p_telegram_id bigint, p_amount bigint, p_reason text, p_idempotency_key text)
RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
    RETURN shop_internal.ledger(p_telegram_id, p_amount, p_reason, p_idempotency_key, NULL);
END $$;

-- p_limit is clamped to 1..200 (20 when null).
CREATE OR REPLACE FUNCTION user_overview(p_telegram_id bigint, p_limit integer)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'telegram_id', p_telegram_id,
        'balance', coalesce((SELECT balance FROM users WHERE telegram_id = p_telegram_id), 0),
        'orders', coalesce((
            SELECT jsonb_agg(shop_internal.order_json(o) ORDER BY o.created_at DESC, o.order_id)
            FROM orders o
            WHERE o.order_id IN (SELECT order_id FROM orders WHERE telegram_id = p_telegram_id
                                 ORDER BY created_at DESC, order_id
                                 LIMIT greatest(1, least(coalesce(p_limit, 20), 200)))
        ), '[]'::jsonb))
$$;

-- --- Suppliers ---------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION supplier_for_token(p_token_hash text)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('id', id, 'name', name, 'telegram_chat_id', telegram_chat_id)
    FROM suppliers WHERE token_hash = lower(p_token_hash)
$$;

-- Newest first, at most 500.
CREATE OR REPLACE FUNCTION supplier_orders(p_supplier_id bigint, p_status text)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(shop_internal.order_json(o) ORDER BY o.created_at DESC, o.order_id),
                    '[]'::jsonb)
    FROM orders o
    WHERE o.order_id IN (SELECT so.order_id FROM orders so JOIN products p ON p.id = so.product_id
                         WHERE p.supplier_id = p_supplier_id
                           AND (p_status IS NULL OR so.status = p_status)
                         ORDER BY so.created_at DESC, so.order_id
                         LIMIT 500)
$$;

-- --- Administration ----------------------------------------------------------------------

CREATE OR REPLACE FUNCTION admin_create_supplier(
    p_name text, p_telegram_chat_id bigint, p_token_hash text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
BEGIN
    IF p_name IS NULL OR btrim(p_name) = '' OR p_telegram_chat_id IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_argument',
            DETAIL = 'A supplier needs a name and a Telegram chat.';
    END IF;
    IF p_token_hash IS NULL OR lower(p_token_hash) !~ '^[0-9a-f]{64}$' THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_argument',
            DETAIL = 'The token hash must be the sha256 hex digest of the token.';
    END IF;
    INSERT INTO suppliers (name, telegram_chat_id, token_hash)
    VALUES (btrim(p_name), p_telegram_chat_id, lower(p_token_hash))
    RETURNING id INTO v_id;
    RETURN jsonb_build_object('id', v_id);
END $$;

CREATE OR REPLACE FUNCTION admin_create_product(
    p_name text, p_description text, p_price bigint, p_currency text, p_made_to_order boolean,
    p_fulfillment_time_hours numeric, p_supplier_id bigint)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
BEGIN
    IF p_name IS NULL OR btrim(p_name) = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_argument',
            DETAIL = 'A product needs a name.';
    END IF;
    IF p_price IS NULL OR p_price <= 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_amount',
            DETAIL = 'The price must be a positive number of minor units.';
    END IF;
    IF p_currency IS NULL OR lower(p_currency) !~ '^[a-z]{3}$' THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_argument',
            DETAIL = 'The currency must be an ISO 4217 code such as usd.';
    END IF;
    IF p_fulfillment_time_hours IS NOT NULL AND p_fulfillment_time_hours <= 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_argument',
            DETAIL = 'The fulfilment time must be positive.';
    END IF;
    IF p_supplier_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM suppliers WHERE id = p_supplier_id)
    THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'supplier_not_found',
            DETAIL = format('There is no supplier %s.', p_supplier_id);
    END IF;
    IF coalesce(p_made_to_order, false) AND p_supplier_id IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'supplier_not_found',
            DETAIL = 'A product made to order needs a supplier.';
    END IF;
    INSERT INTO products (name, description, price, currency, made_to_order,
                          fulfillment_time_hours, supplier_id)
    VALUES (btrim(p_name), coalesce(p_description, ''), p_price, lower(p_currency),
            coalesce(p_made_to_order, false), coalesce(p_fulfillment_time_hours, 48),
            p_supplier_id)
    RETURNING id INTO v_id;
    RETURN jsonb_build_object('id', v_id);
END $$;

CREATE OR REPLACE FUNCTION admin_add_stock(
    p_product_id bigint, p_items jsonb, p_discount_percent integer DEFAULT 0)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_added integer;
BEGIN
    PERFORM 1 FROM products WHERE id = p_product_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'product_not_found',
            DETAIL = format('There is no product %s.', p_product_id);
    END IF;
    IF p_items IS NULL OR jsonb_typeof(p_items) <> 'array' OR EXISTS (
        SELECT 1 FROM jsonb_array_elements(p_items) e
        WHERE jsonb_typeof(e) <> 'string' OR btrim(e #>> '{}') = ''
    ) THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_argument',
            DETAIL = 'Stock items must be a list of non-empty texts.';
    END IF;
    IF p_discount_percent IS NULL OR p_discount_percent NOT BETWEEN 0 AND 90 THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_argument',
            DETAIL = 'The discount must be between 0 and 90 percent.';
    END IF;
    INSERT INTO stock_items (product_id, content, discount_percent)
    SELECT p_product_id, e.value, p_discount_percent
    FROM jsonb_array_elements_text(p_items) WITH ORDINALITY AS e(value, n)
    ORDER BY e.n;
    GET DIAGNOSTICS v_added = ROW_COUNT;
    RETURN jsonb_build_object('added', v_added);
END $$;

-- Newest first; p_limit is clamped to 1..500 (50 when null).
CREATE OR REPLACE FUNCTION admin_shop_orders(p_status text, p_limit integer)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(shop_internal.order_json(o) ORDER BY o.created_at DESC, o.order_id),
                    '[]'::jsonb)
    FROM orders o
    WHERE o.order_id IN (SELECT order_id FROM orders WHERE p_status IS NULL OR status = p_status
                         ORDER BY created_at DESC, order_id
                         LIMIT greatest(1, least(coalesce(p_limit, 50), 500)))
$$;

-- --- Telegram ----------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION claim_telegram_update(p_update_id bigint)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_claimed boolean;
BEGIN
    INSERT INTO telegram_updates (update_id) VALUES (p_update_id)
    ON CONFLICT (update_id) DO NOTHING
    RETURNING true INTO v_claimed;
    RETURN jsonb_build_object('claimed', coalesce(v_claimed, false));
END $$;

-- --- Privileges --------------------------------------------------------------------------

-- On Supabase the anon key is public and, by default, may call every function and read every
-- table in `public`. These functions move money and stock, so only the service role (and the
-- owner, which asyncpg connects as) may use them. Roles missing here (plain Postgres) are
-- skipped. Later migrations call this for what they add.
CREATE OR REPLACE PROCEDURE shop_internal.service_role_only(p_objects text[])
LANGUAGE plpgsql AS $$
DECLARE
    v_object text;
    v_role   text;
BEGIN
    FOREACH v_object IN ARRAY p_objects LOOP
        IF v_object LIKE 'FUNCTION %' OR v_object LIKE 'PROCEDURE %' THEN
            EXECUTE format('REVOKE ALL ON %s FROM PUBLIC', v_object);
        END IF;
        FOREACH v_role IN ARRAY ARRAY['anon', 'authenticated'] LOOP
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
                EXECUTE format('REVOKE ALL ON %s FROM %I', v_object, v_role);
            END IF;
        END LOOP;
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
            EXECUTE format('GRANT ALL ON %s TO service_role', v_object);
        END IF;
    END LOOP;
END $$;

DO $$
DECLARE
    v_objects text[];
BEGIN
    v_objects := ARRAY(
        SELECT 'FUNCTION ' || p.oid::regprocedure::text
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE p.prokind = 'f' AND ((n.nspname = 'shop_internal')
           OR (n.nspname = 'public' AND p.proname = ANY (ARRAY[
            'stars_for_amount', 'shop_catalog', 'reserve_product_for_purchase',
            'release_reservation', 'get_order', 'create_order_with_availability_check',
            'pay_order_from_balance', 'complete_purchase', 'process_prepaid_payment',
            'submit_fulfilment', 'fulfill_prepaid_order', 'expire_order', 'process_refund',
            'record_payment', 'record_external_refund', 'set_order_status',
            'record_telegram_delivery', 'get_order_content', 'add_to_user_balance',
            'user_overview', 'supplier_for_token', 'supplier_orders', 'admin_create_supplier',
            'admin_create_product', 'admin_add_stock', 'admin_shop_orders',
            'claim_telegram_update'])))
        UNION ALL
        SELECT 'PROCEDURE shop_internal.service_role_only(text[])'
        UNION ALL
        SELECT 'TABLE ' || quote_ident(t) FROM unnest(ARRAY[
            'users', 'suppliers', 'products', 'stock_items', 'orders', 'order_fulfilments',
            'balance_transactions', 'telegram_updates', 'available_stock_with_discounts']) t);
    CALL shop_internal.service_role_only(v_objects);
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
        GRANT USAGE ON SCHEMA shop_internal TO service_role;
    END IF;
END $$;
