-- The bot's sales assistant (workflows/chat.py): what its tools may read of the shop, and the
-- record of its model calls. The assistant changes stock and money only by starting purchase
-- workflows, which call 0003's functions like any other order.
--
-- Refusals: SQLSTATE P0001, MESSAGE = a stable code, DETAIL = a sentence (as in 0003).

-- One product as a buyer of p_quantity would find it now: the catalog's fields (the same
-- view, the same final price) plus whether that many units can be sold from stock at once.
-- The payable amount is still the order's: units are claimed highest discount first, so a
-- larger quantity may average a smaller discount than `final_price` shows.
CREATE OR REPLACE FUNCTION product_availability(
    p_product_id bigint, p_quantity integer, p_stars_per_unit numeric, p_max_quantity integer)
RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE
    v available_stock_with_discounts;
BEGIN
    IF p_quantity IS NULL OR p_quantity < 1 OR p_quantity > coalesce(p_max_quantity, p_quantity)
    THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_quantity',
            DETAIL = format('The quantity must be between 1 and %s.', p_max_quantity);
    END IF;
    IF p_stars_per_unit IS NULL OR p_stars_per_unit <= 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'invalid_argument',
            DETAIL = 'The Stars rate must be positive.';
    END IF;
    SELECT * INTO v FROM available_stock_with_discounts WHERE product_id = p_product_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'product_not_found',
            DETAIL = format('There is no product %s.', p_product_id);
    END IF;
    IF v.status <> 'active' THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'product_unavailable',
            DETAIL = format('%s is not on sale.', v.name);
    END IF;
    RETURN jsonb_build_object(
        'product_id', v.product_id,
        'name', v.name,
        'requested', p_quantity,
        'available', v.available,
        'in_stock', v.available >= p_quantity,
        'made_to_order', v.made_to_order,
        'fulfillment_time_hours', v.fulfillment_time_hours,
        'final_price', v.final_price,
        'discount_percent', v.discount_percent,
        'currency', v.currency,
        'price_stars', stars_for_amount(v.final_price, p_stars_per_unit));
END $$;

-- One row per model call: what the cache saved shows in cached_tokens.
CREATE TABLE IF NOT EXISTS assistant_model_calls (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The activity attempt that made the call: a retried activity records it once.
    call_key      text        NOT NULL UNIQUE,
    chat_id       bigint      NOT NULL,
    model         text        NOT NULL,
    cache_name    text,
    prompt_tokens integer     NOT NULL DEFAULT 0 CHECK (prompt_tokens >= 0),
    cached_tokens integer     NOT NULL DEFAULT 0 CHECK (cached_tokens >= 0),
    output_tokens integer     NOT NULL DEFAULT 0 CHECK (output_tokens >= 0),
    model_ms      integer     NOT NULL DEFAULT 0 CHECK (model_ms >= 0),
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION record_model_call(
    p_call_key text, p_chat_id bigint, p_model text, p_cache_name text, p_prompt_tokens integer,
    p_cached_tokens integer, p_output_tokens integer, p_model_ms integer)
RETURNS jsonb LANGUAGE sql AS $$
    INSERT INTO assistant_model_calls (call_key, chat_id, model, cache_name, prompt_tokens,
                                       cached_tokens, output_tokens, model_ms)
    VALUES (p_call_key, p_chat_id, p_model, p_cache_name, greatest(coalesce(p_prompt_tokens, 0), 0),
            greatest(coalesce(p_cached_tokens, 0), 0), greatest(coalesce(p_output_tokens, 0), 0),
            greatest(coalesce(p_model_ms, 0), 0))
    ON CONFLICT (call_key) DO NOTHING;
    SELECT jsonb_build_object('recorded', true)
$$;

-- Totals for GET /api/admin/metrics.
CREATE OR REPLACE FUNCTION assistant_metrics()
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'assistant_model_calls_total', count(*),
        'assistant_cache_hits_total', count(*) FILTER (WHERE cached_tokens > 0),
        'assistant_cached_tokens_total', coalesce(sum(cached_tokens), 0),
        'assistant_prompt_tokens_total', coalesce(sum(prompt_tokens), 0))
    FROM assistant_model_calls
$$;

-- As in 0003: only the owner and Supabase's service_role reach these.
CALL shop_internal.service_role_only(ARRAY[
    'FUNCTION product_availability(bigint, integer, numeric, integer)',
    'FUNCTION record_model_call(text, bigint, text, text, integer, integer, integer, integer)',
    'FUNCTION assistant_metrics()',
    'TABLE assistant_model_calls']);
