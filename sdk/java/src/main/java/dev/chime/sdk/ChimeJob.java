// Annotation naming a job handler method (see Worker.Builder#handlers).
package dev.chime.sdk;

import java.lang.annotation.ElementType;
import java.lang.annotation.Retention;
import java.lang.annotation.RetentionPolicy;
import java.lang.annotation.Target;

/** Marks {@code String method(JobContext)} as the job handler {@link #value()}. */
@Retention(RetentionPolicy.RUNTIME)
@Target(ElementType.METHOD)
public @interface ChimeJob {
    /** The handler name. */
    String value();
}
