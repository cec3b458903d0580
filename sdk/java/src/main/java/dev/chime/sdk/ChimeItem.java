// Annotation naming an item handler method (see Worker.Builder#handlers).
package dev.chime.sdk;

import java.lang.annotation.ElementType;
import java.lang.annotation.Retention;
import java.lang.annotation.RetentionPolicy;
import java.lang.annotation.Target;

/** Marks {@code void method(ItemContext)} as the item handler {@link #value()}. */
@Retention(RetentionPolicy.RUNTIME)
@Target(ElementType.METHOD)
public @interface ChimeItem {
    /** The handler name. */
    String value();
}
